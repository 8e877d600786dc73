"""Configuration: validation at construction, environment fallbacks, and the token kept secret."""

from __future__ import annotations

import ipaddress
import logging
from typing import Any

import pytest
from werkzeug.test import Client

from alf_analytics import AnalyticsWSGIMiddleware
from alf_analytics._alf import alf_envelope
from alf_analytics._config import (
    DEFAULT_COLLECTOR_URL,
    DEFAULT_REDACT_HEADERS,
    ENV_VARS,
    make_config,
)
from alf_analytics.collector import Collector

from .conftest import received_entries

TOKEN = "cfg-secret-token-0123456789"


def hello_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"hello"]


@pytest.fixture(autouse=True)
def _no_alf_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The ALF_* variables of the machine running the tests never leak into a test."""
    for variable in ENV_VARS.values():
        monkeypatch.delenv(variable, raising=False)


def test_defaults_match_the_documented_values() -> None:
    """Only a token given: every other option takes its documented default."""
    config = make_config({"service_token": TOKEN})
    assert config.service_token == TOKEN
    assert config.environment is None
    assert config.collector_url == DEFAULT_COLLECTOR_URL
    assert config.log_body is False
    assert (config.batch_size, config.delay) == (100, 2.0)
    assert config.max_batch_bytes == 1_000_000
    assert config.redact_headers == {
        "authorization",
        "proxy-authorization",
        "cookie",
        "set-cookie",
        "x-api-key",
        "x-auth-token",
    }
    assert config.trusted_proxies == ()
    assert config.group == (TOKEN, None)


INVALID = [
    pytest.param({}, ValueError, ["service_token", "ALF_SERVICE_TOKEN"], id="missing-token"),
    pytest.param({"service_token": "   "}, ValueError, ["service_token"], id="blank-token"),
    pytest.param({"service_token": 1234}, TypeError, ["service_token", "int"], id="int-token"),
    pytest.param({"batch_size": -1}, ValueError, ["batch_size=-1"], id="negative-batch-size"),
    pytest.param({"batch_size": 0}, ValueError, ["batch_size=0"], id="zero-batch-size"),
    pytest.param({"batch_size": True}, TypeError, ["batch_size", "bool"], id="bool-batch-size"),
    pytest.param({"batch_size": 2.5}, TypeError, ["batch_size", "float"], id="float-batch-size"),
    pytest.param({"batch_size": "100"}, TypeError, ["batch_size", "str"], id="str-batch-size"),
    pytest.param({"queue_size": 0}, ValueError, ["queue_size=0"], id="zero-queue-size"),
    pytest.param({"retries": -1}, ValueError, ["retries=-1"], id="negative-retries"),
    pytest.param({"retries": False}, TypeError, ["retries", "bool"], id="bool-retries"),
    pytest.param({"max_body_bytes": -5}, ValueError, ["max_body_bytes=-5"], id="negative-cap"),
    pytest.param(
        {"max_batch_bytes": 100}, ValueError, ["max_batch_bytes=100"], id="tiny-batch-bytes"
    ),
    pytest.param({"delay": float("nan")}, ValueError, ["delay=nan"], id="nan-delay"),
    pytest.param({"delay": float("inf")}, ValueError, ["delay=inf"], id="inf-delay"),
    pytest.param({"delay": -2.0}, ValueError, ["delay=-2.0"], id="negative-delay"),
    pytest.param({"delay": 0}, ValueError, ["delay=0"], id="zero-delay"),
    pytest.param({"delay": "2"}, TypeError, ["delay", "str"], id="str-delay"),
    pytest.param({"delay": True}, TypeError, ["delay", "bool"], id="bool-delay"),
    pytest.param({"timeout": 0.0}, ValueError, ["timeout=0.0"], id="zero-timeout"),
    pytest.param(
        {"shutdown_timeout": float("nan")}, ValueError, ["shutdown_timeout=nan"], id="nan-shutdown"
    ),
    pytest.param({"retry_backoff": -1}, ValueError, ["retry_backoff=-1"], id="negative-backoff"),
    pytest.param(
        {"collector_url": "ftp://collector.example"},
        ValueError,
        ["collector_url='ftp://collector.example'", "http"],
        id="ftp-url",
    ),
    pytest.param(
        {"collector_url": "collector.example:8700"},
        ValueError,
        ["collector_url='collector.example:8700'"],
        id="url-without-scheme",
    ),
    pytest.param({"collector_url": "http://"}, ValueError, ["collector_url"], id="url-no-host"),
    pytest.param(
        {"collector_url": "http://h:99999"}, ValueError, ["collector_url", "99999"], id="bad-port"
    ),
    pytest.param(
        {"collector_url": "http://h/?a=1"}, ValueError, ["collector_url", "query"], id="url-query"
    ),
    pytest.param({"collector_url": 8700}, TypeError, ["collector_url", "int"], id="int-url"),
    pytest.param({"log_body": "yes"}, ValueError, ["log_body='yes'", "request"], id="str-log-body"),
    pytest.param({"log_body": 1}, TypeError, ["log_body", "int"], id="int-log-body"),
    pytest.param({"environment": 5}, TypeError, ["environment", "int"], id="int-environment"),
    pytest.param(
        {"redact_headers": "authorization"}, TypeError, ["redact_headers"], id="str-redact"
    ),
    pytest.param({"redact_headers": [""]}, ValueError, ["redact_headers=''"], id="empty-redact"),
    pytest.param(
        {"trusted_proxies": ["not-an-ip"]},
        ValueError,
        ["trusted_proxies='not-an-ip'"],
        id="bad-proxy",
    ),
    pytest.param({"trusted_proxies": "10.0.0.1"}, TypeError, ["trusted_proxies"], id="str-proxy"),
    pytest.param({"batchsize": 10}, TypeError, ["batchsize"], id="unknown-option"),
]


@pytest.mark.parametrize(("options", "error", "fragments"), INVALID)
def test_invalid_option_fails_at_construction(
    options: dict[str, Any], error: type[Exception], fragments: list[str]
) -> None:
    """A bad option raises at construction, naming the option and the bad value."""
    if "service_token" not in options and options:
        options = {"service_token": TOKEN, **options}
    with pytest.raises(error) as caught:
        AnalyticsWSGIMiddleware(hello_app, **options)
    message = str(caught.value)
    for fragment in fragments:
        assert fragment in message, message
    assert TOKEN not in message


@pytest.mark.parametrize(
    "options",
    [
        pytest.param({"batch_size": -1}, id="other-option"),
        pytest.param({"nope": 1}, id="unknown-option"),
        pytest.param({"collector_url": "ftp://x"}, id="url"),
        pytest.param({"service_token": 42}, id="token-wrong-type"),
    ],
)
def test_error_messages_never_contain_the_token(options: dict[str, Any]) -> None:
    """However construction fails, the token is not in the exception text."""
    secret = "tok-" + "s3cr3t" * 5
    with pytest.raises((TypeError, ValueError)) as caught:
        make_config({"service_token": secret, **options})
    assert "s3cr3t" not in str(caught.value)
    assert "s3cr3t" not in repr(caught.value)


def test_repr_and_logs_mask_the_token(caplog: pytest.LogCaptureFixture) -> None:
    """repr(config) and the agent's own log lines show at most the token's last characters."""
    caplog.set_level(logging.DEBUG, logger="alf_analytics")
    middleware = AnalyticsWSGIMiddleware(hello_app, service_token=TOKEN)
    shown = repr(middleware.config)
    assert TOKEN not in shown and TOKEN not in str(middleware.config)
    assert "***6789" in shown
    assert caplog.records, "expected the worker's debug line"
    assert all(TOKEN not in record.getMessage() for record in caplog.records)


def test_short_token_is_fully_masked() -> None:
    """A token too short to show a suffix is shown only as stars."""
    assert "short" not in repr(make_config({"service_token": "short"}))


def test_token_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """ALF_SERVICE_TOKEN is used when no service_token is passed."""
    monkeypatch.setenv("ALF_SERVICE_TOKEN", "  env-token-0001  ")
    assert make_config({}).service_token == "env-token-0001"


def test_explicit_options_beat_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keyword options win over every ALF_* variable."""
    monkeypatch.setenv("ALF_SERVICE_TOKEN", "env-token-0001")
    monkeypatch.setenv("ALF_ENVIRONMENT", "from-env")
    monkeypatch.setenv("ALF_COLLECTOR_URL", "http://env.example:1")
    monkeypatch.setenv("ALF_LOG_BODY", "true")
    config = make_config(
        {
            "service_token": TOKEN,
            "environment": "staging",
            "collector_url": "http://kw.example:2/",
            "log_body": False,
        }
    )
    assert (config.service_token, config.environment) == (TOKEN, "staging")
    assert config.collector_url == "http://kw.example:2"
    assert config.log_body is False


def test_environment_and_collector_url_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """ALF_ENVIRONMENT and ALF_COLLECTOR_URL fill their options (trailing slash removed)."""
    monkeypatch.setenv("ALF_ENVIRONMENT", "production")
    monkeypatch.setenv("ALF_COLLECTOR_URL", "https://collector.example:8443/")
    config = make_config({"service_token": TOKEN})
    assert config.environment == "production"
    assert config.collector_url == "https://collector.example:8443"
    assert config.group == (TOKEN, "production")


def test_bad_collector_url_from_environment_names_the_option(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A bad ALF_COLLECTOR_URL fails like a bad keyword, naming collector_url."""
    monkeypatch.setenv("ALF_COLLECTOR_URL", "gopher://old.example")
    with pytest.raises(
        ValueError,
        match=r"ALF_COLLECTOR_URL='gopher://old\.example' \(the environment variable for option "
        r"collector_url\)",
    ):
        make_config({"service_token": TOKEN})


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        pytest.param("1", True, id="1"),
        pytest.param("true", True, id="true"),
        pytest.param(" YES ", True, id="yes"),
        pytest.param("on", True, id="on"),
        pytest.param("0", False, id="0"),
        pytest.param("False", False, id="false"),
        pytest.param("no", False, id="no"),
        pytest.param("", False, id="empty"),
    ],
)
def test_log_body_from_environment(
    monkeypatch: pytest.MonkeyPatch, raw: str, expected: bool
) -> None:
    """ALF_LOG_BODY accepts the usual spellings of true and false."""
    monkeypatch.setenv("ALF_LOG_BODY", raw)
    assert make_config({"service_token": TOKEN}).log_body is expected


def test_log_body_garbage_in_environment_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    """An ALF_LOG_BODY that is neither true nor false raises, naming log_body and the value."""
    monkeypatch.setenv("ALF_LOG_BODY", "maybe")
    with pytest.raises(
        ValueError, match=r"ALF_LOG_BODY='maybe' \(the environment variable for option log_body\)"
    ):
        make_config({"service_token": TOKEN})


@pytest.mark.parametrize(
    "options",
    [
        pytest.param({}, id="unset"),
        pytest.param({"environment": ""}, id="empty"),
        pytest.param({"environment": "   "}, id="blank"),
    ],
)
def test_environment_absent_when_unset_or_empty(options: dict[str, Any]) -> None:
    """No environment (or an empty one) leaves the field out of the ALF object."""
    config = make_config({"service_token": TOKEN, **options})
    assert config.environment is None
    assert "environment" not in alf_envelope(*config.group)


def test_empty_environment_variable_leaves_environment_out(
    monkeypatch: pytest.MonkeyPatch, collector: Collector
) -> None:
    """ALF_ENVIRONMENT='' sends ALF objects without an environment, accepted by the collector."""
    monkeypatch.setenv("ALF_ENVIRONMENT", "")
    middleware = AnalyticsWSGIMiddleware(
        hello_app, service_token=TOKEN, collector_url=collector.url
    )
    Client(middleware).get("/").close()
    received_entries(collector, 1)
    (alf,) = collector.alfs()
    assert "environment" not in alf
    assert alf["serviceToken"] == TOKEN
    assert collector.entries()[0].environment is None


def test_configured_environment_reaches_the_collector(collector: Collector) -> None:
    """A configured environment is carried on the ALF object."""
    middleware = AnalyticsWSGIMiddleware(
        hello_app, service_token=TOKEN, environment="staging", collector_url=collector.url
    )
    Client(middleware).get("/").close()
    received_entries(collector, 1)
    assert collector.alfs()[0]["environment"] == "staging"


def test_redact_headers_and_trusted_proxies_are_normalised() -> None:
    """Header names are lower-cased; proxies accept addresses and networks, v4 and v6."""
    config = make_config(
        {
            "service_token": TOKEN,
            "redact_headers": [" X-Api-Key ", "AUTHORIZATION"],
            "trusted_proxies": ["10.0.0.1", "192.168.0.0/16", "::1"],
        }
    )
    # Given names add to the defaults: extending never drops Authorization or Cookie.
    assert config.redact_headers == DEFAULT_REDACT_HEADERS | {"x-api-key", "authorization"}
    assert config.trusted_proxies == (
        ipaddress.ip_network("10.0.0.1/32"),
        ipaddress.ip_network("192.168.0.0/16"),
        ipaddress.ip_network("::1/128"),
    )
    assert make_config({"service_token": TOKEN}).redact_headers == DEFAULT_REDACT_HEADERS
