"""Configuration: validation at construction, environment fallbacks, and the token kept secret."""

from __future__ import annotations

import ipaddress
import logging
import re
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
    # Finite, yet past what a thread wait takes (OverflowError at shutdown, not at startup).
    pytest.param(
        {"shutdown_timeout": 1e300}, ValueError, ["shutdown_timeout=1e+300"], id="huge-shutdown"
    ),
    pytest.param({"delay": 604_801}, ValueError, ["delay=604801", "604800"], id="huge-delay"),
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


# -- every option, typed once, from the environment ----------------------------------------------


def test_options_typeddict_and_validators_name_the_same_options() -> None:
    """One definition: the typed Options, the validators, the Config fields and ENV_VARS agree."""
    from dataclasses import fields

    from alf_analytics import Options
    from alf_analytics._config import OPTION_NAMES, Config

    init_fields = {f.name for f in fields(Config) if f.init}
    derived = {"redact_header_substrings", "redact_key_substrings", "given"}
    assert set(Options.__annotations__) == OPTION_NAMES == init_fields - derived
    assert {name: f"ALF_{name.upper()}" for name in OPTION_NAMES} == ENV_VARS


ENV_VALUES = [
    ("ALF_ENABLED", "false", "enabled", False),
    ("ALF_REQUIRE_TOKEN", "0", "require_token", False),
    ("ALF_LOG_BODY", "response", "log_body", "response"),
    (
        "ALF_LOG_BODY_TYPES",
        "application/json, text/*",
        "log_body_types",
        ("application/json", "text/*"),
    ),
    ("ALF_MAX_BODY_BYTES", "1024", "max_body_bytes", 1024),
    ("ALF_SKIP_PATHS", "/health,/static/*", "skip_paths", ("/health", "/static/*")),
    ("ALF_SKIP_METHODS", "options, head", "skip_methods", frozenset({"OPTIONS", "HEAD"})),
    ("ALF_SAMPLE_RATE", "0.25", "sample_rate", 0.25),
    ("ALF_DEFAULT_REDACTIONS", "no", "default_redactions", False),
    ("ALF_CLIENT_IP", "anonymized", "client_ip", "anonymized"),
    ("ALF_TRUSTED_PROXIES", "10.0.0.0/8", "trusted_proxies", (ipaddress.ip_network("10.0.0.0/8"),)),
    ("ALF_FORWARDED_HEADER", "forwarded", "forwarded_header", "forwarded"),
    ("ALF_BATCH_SIZE", "7", "batch_size", 7),
    ("ALF_DELAY", "0.5", "delay", 0.5),
    ("ALF_MAX_BATCH_BYTES", "2_000_000", "max_batch_bytes", 2_000_000),
    ("ALF_QUEUE_SIZE", "9", "queue_size", 9),
    ("ALF_MAX_QUEUE_BYTES", "1048576", "max_queue_bytes", 1_048_576),
    ("ALF_MAX_INFLIGHT", "2", "max_inflight", 2),
    ("ALF_TIMEOUT", "3", "timeout", 3.0),
    ("ALF_RETRIES", "0", "retries", 0),
    ("ALF_RETRY_BACKOFF", "0", "retry_backoff", 0.0),
    ("ALF_SHUTDOWN_TIMEOUT", "1.5", "shutdown_timeout", 1.5),
    ("ALF_DEBUG", "1", "debug", True),
]


@pytest.mark.parametrize(
    ("variable", "raw", "name", "expected"), ENV_VALUES, ids=[v[0] for v in ENV_VALUES]
)
def test_every_option_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, variable: str, raw: str, name: str, expected: Any
) -> None:
    monkeypatch.setenv(variable, raw)
    assert getattr(make_config({"service_token": TOKEN}), name) == expected


def test_redaction_lists_from_the_environment_add_to_the_defaults(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ALF_REDACT_HEADERS", "X-Internal, x-tenant")
    monkeypatch.setenv("ALF_REDACT_QUERY", "otp")
    monkeypatch.setenv("ALF_REDACT_BODY_KEYS", "pin")
    config = make_config({"service_token": TOKEN})
    assert {"x-internal", "x-tenant", "authorization"} <= config.redact_headers
    assert {"otp", "api_key"} <= config.redact_query
    assert {"pin", "password"} <= config.redact_body_keys


def test_explicit_argument_beats_every_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    for variable, raw, _, _ in ENV_VALUES:
        monkeypatch.setenv(variable, raw)
    config = make_config(
        {"service_token": TOKEN, "batch_size": 50, "sample_rate": 1, "debug": False}
    )
    assert (config.batch_size, config.sample_rate, config.debug) == (50, 1.0, False)


@pytest.mark.parametrize(
    ("variable", "raw"),
    [
        ("ALF_BATCH_SIZE", "ten"),
        ("ALF_BATCH_SIZE", "0"),
        ("ALF_DELAY", "soon"),
        ("ALF_SAMPLE_RATE", "1.5"),
        ("ALF_SAMPLE_RATE", "nan"),
        ("ALF_ENABLED", "maybe"),
        ("ALF_CLIENT_IP", "partial"),
        ("ALF_TRUSTED_PROXIES", "10.0.0.0/8,not-an-ip"),
        ("ALF_SKIP_PATHS", "health"),
        ("ALF_LOG_BODY_TYPES", "json"),
    ],
)
def test_bad_environment_value_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, raw: str
) -> None:
    monkeypatch.setenv(variable, raw)
    with pytest.raises(ValueError, match=rf"{variable}=.* \(the environment variable for option"):
        make_config({"service_token": TOKEN})


def test_callable_options_are_never_read_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("skip", "identify", "before_send"):
        monkeypatch.setenv(ENV_VARS[name], "os.system")
    config = make_config({"service_token": TOKEN})
    assert (config.skip, config.identify, config.before_send) == (None, None, None)


# -- cross-option checks -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "given",
    [
        "http://collector.test:8700/1.1.0/batch",
        "http://collector.test:8700/1.0.0/single/",
        "http://collector.test:8700/1.1.0/single",
        "http://collector.test:8700",
    ],
)
def test_collector_url_with_an_endpoint_means_its_base(given: str) -> None:
    config = make_config({"service_token": TOKEN, "collector_url": given})
    assert config.collector_url == "http://collector.test:8700"


def test_collector_url_keeps_a_base_path() -> None:
    config = make_config(
        {"service_token": TOKEN, "collector_url": "https://x.test/alf/1.1.0/batch"}
    )
    assert config.collector_url == "https://x.test/alf"


def test_default_collector_url_is_the_local_collector() -> None:
    assert make_config({"service_token": TOKEN}).collector_url == "http://127.0.0.1:8700"


def test_credentials_in_collector_url_never_show_in_errors_or_repr() -> None:
    config = make_config({"service_token": TOKEN, "collector_url": "http://user:pw-s3cret@h.test"})
    assert "pw-s3cret" not in repr(config)
    with pytest.raises(ValueError) as raised:
        make_config({"service_token": TOKEN, "collector_url": "ftp://user:pw-s3cret@h.test"})
    assert "pw-s3cret" not in str(raised.value)


def test_a_query_in_collector_url_is_refused_without_showing_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A query in collector_url is refused; it may hold a credential, so the error omits it."""
    url = "https://u:url-password@collector.example/base?api_key=url-query-secret#frag"
    with pytest.raises(ValueError) as raised:
        make_config({"service_token": TOKEN, "collector_url": url})
    message = str(raised.value)
    assert "collector_url='https://***@collector.example/base?...'" in message
    assert "url-query-secret" not in message and "url-password" not in message
    monkeypatch.setenv("ALF_COLLECTOR_URL", url)
    with pytest.raises(ValueError) as raised:
        make_config({"service_token": TOKEN})
    message = str(raised.value)
    assert "ALF_COLLECTOR_URL" in message
    assert "url-query-secret" not in message and "url-password" not in message
    monkeypatch.setenv("ALF_COLLECTOR_URL", "http://u:url-password@h.test:99999")
    with pytest.raises(ValueError) as raised:
        make_config({"service_token": TOKEN})
    assert "url-password" not in str(raised.value) and "***@h.test" in str(raised.value)


@pytest.mark.parametrize(
    "url",
    [
        "user:s3cretpw@collector.internal:8700",  # no scheme
        "//user:s3cretpw@collector.internal",
        "http:/user:s3cretpw@collector.internal",  # one slash
        "http://user:s3c/retpw@collector.internal/base",  # a raw slash in the password
    ],
)
def test_a_malformed_collector_url_is_refused_without_its_password(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ValueError) as raised:
        make_config({"service_token": TOKEN, "collector_url": url}, environ={})
    assert "s3cretpw" not in str(raised.value) and "retpw" not in str(raised.value)
    assert "***@collector.internal" in str(raised.value)
    with pytest.raises(ValueError) as raised:
        make_config({"service_token": TOKEN}, environ={"ALF_COLLECTOR_URL": url})
    assert "ALF_COLLECTOR_URL" in str(raised.value) and "retpw" not in str(raised.value)


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1 :8700",
        "http://127.0.0.1:8700/a b",
        "http://collector\t.internal",
        "http://collector.internal/x\x00y",
        "http://collector.internal/\x7f",
    ],
)
def test_a_collector_url_with_spaces_or_control_characters_is_refused(url: str) -> None:
    """urlsplit takes them, but no request could ever be sent there: every batch would be
    lost, so the option is refused at configuration time."""
    with pytest.raises(ValueError, match="collector_url.*spaces or control characters"):
        make_config({"service_token": TOKEN, "collector_url": url}, environ={})


@pytest.mark.parametrize(
    ("log_body", "max_body_bytes", "refused"),
    [
        (True, 400_000, True),  # 2 x 533,336 base64 bytes > 1,000,000
        ("request", 700_000, False),  # 933,336 + 8,192 fits
        ("request", 745_000, True),
        (False, 10_000_000, False),  # bodies off: nothing to fit
    ],
)
def test_max_body_bytes_must_fit_max_batch_bytes_after_base64(
    log_body: Any, max_body_bytes: int, refused: bool
) -> None:
    options = {"service_token": TOKEN, "log_body": log_body, "max_body_bytes": max_body_bytes}
    if not refused:
        make_config(options)
        return
    with pytest.raises(ValueError) as raised:
        make_config(options)
    message = str(raised.value)
    assert "base64" in message and "max_batch_bytes=1000000" in message
    assert "raise max_batch_bytes to at least" in message


def test_unknown_option_suggests_the_closest_name() -> None:
    with pytest.raises(TypeError, match=r"skip_path \(did you mean skip_paths\?\)"):
        make_config({"service_token": TOKEN, "skip_path": ["/health"]})


@pytest.mark.parametrize(
    ("options", "exception", "words"),
    [
        ({"log_body": "both"}, ValueError, ["log_body='both'"]),
        ({"log_body_types": "application/json"}, TypeError, ["log_body_types", "one string"]),
        ({"log_body_types": ["application/*json"]}, ValueError, ["type/subtype"]),
        ({"skip_paths": ["health"]}, ValueError, ["skip_paths='health'", 'start with "/"']),
        ({"skip_paths": ["/a/*/b"]}, ValueError, ["re.compile"]),
        ({"skip_paths": [re.compile(rb"/x")]}, ValueError, ["str patterns"]),
        ({"sample_rate": 2}, ValueError, ["sample_rate=2", "between 0 and 1"]),
        ({"sample_rate": float("nan")}, ValueError, ["sample_rate"]),
        ({"client_ip": "masked"}, ValueError, ["client_ip='masked'", "'anonymized'"]),
        ({"forwarded_header": "x-real-ip"}, ValueError, ["forwarded_header"]),
        ({"identify": "user"}, TypeError, ["identify", "callable"]),
        ({"skip": 5}, TypeError, ["skip", "callable"]),
        ({"max_inflight": 0}, ValueError, ["max_inflight=0"]),
        ({"max_queue_bytes": 10}, ValueError, ["max_queue_bytes=10"]),
        # Accepted before, though no entry (charged ~3 KiB before it is built) could fit.
        ({"max_queue_bytes": 2000}, ValueError, ["max_queue_bytes=2000", ">= 8192"]),
        ({"enabled": "yes"}, TypeError, ["enabled", "bool"]),
    ],
)
def test_new_options_are_validated(
    options: dict[str, Any], exception: type[Exception], words: list[str]
) -> None:
    with pytest.raises(exception) as raised:
        make_config({"service_token": TOKEN, **options})
    for word in words:
        assert word in str(raised.value)


def test_async_callables_are_refused() -> None:
    """Callables run on the request path and are not awaited: a coroutine function is a bug."""

    async def identify(request: Any) -> str:
        return "never awaited"

    with pytest.raises(ValueError, match="plain function"):
        make_config({"service_token": TOKEN, "identify": identify})


@pytest.mark.parametrize(
    "name", ["identify", "skip", "service_token", "environment", "before_send"]
)
def test_callables_of_the_wrong_arity_are_refused_at_construction(name: str) -> None:
    """A callable that cannot take the one argument would fail at every request (logged once,
    its feature silently off): refused at construction, naming the option."""

    def two(request: Any, other: Any) -> str:
        return "never called"

    def none() -> str:
        return "never called"

    for bad in (two, none):
        with pytest.raises(ValueError, match=f"option {name}=.*must take one argument"):
            make_config({"service_token": TOKEN, name: bad})

    def with_defaults(request: Any, other: Any = None, *rest: Any, **named: Any) -> None:
        return None

    class Callable:
        def __call__(self, request: Any) -> None:
            return None

    for good in (with_defaults, Callable(), lambda *args: None):
        make_config({"service_token": TOKEN, name: good})


def test_an_async_before_send_is_refused_saying_where_it_runs() -> None:
    async def before_send(entry: Any) -> Any:
        return entry

    with pytest.raises(ValueError, match="runs on the worker thread, not awaited"):
        make_config({"service_token": TOKEN, "before_send": before_send})


def test_callable_token_is_named_not_shown() -> None:
    def token_for(request: Any) -> str:
        return "tenant-token-0123456789"

    config = make_config({"service_token": token_for})
    assert "token_for" in repr(config) and config.active


def test_body_type_allow_list_matching() -> None:
    config = make_config({"service_token": TOKEN})
    allowed = config.body_type_allowed
    assert allowed("application/json; charset=utf-8") and allowed(b"application/vnd.api+json")
    assert allowed("text/plain") and allowed("application/x-www-form-urlencoded")
    assert allowed("application/soap+xml") and allowed("APPLICATION/XML")
    assert not allowed("text/event-stream")  # never by a wildcard
    assert not allowed("application/octet-stream") and not allowed("image/png")
    assert not allowed(None) and not allowed("")
    everything = make_config({"service_token": TOKEN, "log_body_types": ["*/*"]})
    assert everything.body_type_allowed("image/png") and everything.body_type_allowed(None)
    assert not everything.body_type_allowed("text/event-stream")


def test_skip_rules_match_exact_prefix_and_pattern() -> None:
    config = make_config(
        {"service_token": TOKEN, "skip_paths": ["/health", "/static/*", re.compile(r"\.png$")]}
    )
    assert config.skips_path("/health") and not config.skips_path("/health/deep")
    assert config.skips_path("/static/") and config.skips_path("/static/a/b.js")
    assert config.skips_path("/img/logo.png") and not config.skips_path("/")


def test_default_redactions_false_keeps_only_the_given_lists() -> None:
    config = make_config(
        {"service_token": TOKEN, "default_redactions": False, "redact_headers": ["x-a"]}
    )
    assert config.redact_headers == {"x-a"}
    assert config.redact_header_substrings == config.redact_key_substrings == frozenset()
    assert config.redact_query == frozenset() and config.redact_body_keys == frozenset()


# -- the wrong kind of app -----------------------------------------------------------------------


def test_wsgi_middleware_refuses_an_asgi_app() -> None:
    from starlette.applications import Starlette

    async def asgi_app(scope: Any, receive: Any, send: Any) -> None:
        pass

    for app in (asgi_app, Starlette()):
        with pytest.raises(TypeError, match="given an ASGI app.*AnalyticsASGIMiddleware"):
            AnalyticsWSGIMiddleware(app, service_token=TOKEN)  # type: ignore[arg-type]


def test_wsgi_middleware_refuses_an_object_asgiref_marks_as_async() -> None:
    """Django's way (``markcoroutinefunction``): inspect sees its mark only from Python 3.12."""
    from asgiref.sync import markcoroutinefunction

    class Marked:
        def __init__(self) -> None:
            markcoroutinefunction(self)

        def __call__(self, scope: Any, receive: Any, send: Any) -> Any:
            return self._serve(scope, receive, send)

        async def _serve(self, scope: Any, receive: Any, send: Any) -> None:
            pass

    with pytest.raises(TypeError, match="given an ASGI app.*AnalyticsASGIMiddleware"):
        AnalyticsWSGIMiddleware(Marked(), service_token=TOKEN)  # type: ignore[arg-type]


def test_asgi_middleware_refuses_a_wsgi_app() -> None:
    from flask import Flask

    from alf_analytics import AnalyticsASGIMiddleware

    for app in (hello_app, Flask(__name__), Flask(__name__).wsgi_app):
        with pytest.raises(TypeError, match="given a WSGI app.*AnalyticsWSGIMiddleware"):
            AnalyticsASGIMiddleware(app, service_token=TOKEN)  # type: ignore[arg-type]


def test_asgi_middleware_says_so_at_the_first_request_for_a_sync_callable() -> None:
    """A callable it could not tell apart at construction: a clear error at the first request."""
    import asyncio

    from alf_analytics import AnalyticsASGIMiddleware

    def not_asgi(*args: Any) -> None:
        return None

    middleware = AnalyticsASGIMiddleware(not_asgi, service_token=TOKEN)  # type: ignore[arg-type]
    scope = {"type": "http", "method": "GET", "path": "/", "headers": []}

    async def receive() -> dict[str, Any]:
        return {"type": "http.request"}

    async def send(message: Any) -> None:
        pass

    with pytest.raises(TypeError, match="not an awaitable: it is not an ASGI app"):
        asyncio.run(middleware(scope, receive, send))


def test_wsgi_middleware_says_so_when_the_app_returns_a_coroutine() -> None:
    class Sneaky:
        """Sync __call__ returning a coroutine: only the first request can tell."""

        def __call__(self, *args: Any) -> Any:
            async def run() -> None:
                pass

            return run()

    middleware = AnalyticsWSGIMiddleware(Sneaky(), service_token=TOKEN)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="returned a coroutine: it is an ASGI app"):
        Client(middleware).get("/")


def test_readme_options_table_states_every_option_its_default_and_variable() -> None:
    """The README's one table: a row per option, with its ALF_ variable (callables: none)."""
    from pathlib import Path

    from alf_analytics._config import OPTION_NAMES

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    table = readme.split("## Options", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in table.splitlines():
        # Split on the cell borders only ("\|" inside a cell is an escaped pipe).
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]
        if len(cells) == 4 and cells[0].startswith("`"):
            rows[cells[0].strip("`")] = cells
    assert set(rows) == OPTION_NAMES
    for name, (_, _, variable, _) in rows.items():
        expected = "" if name in {"skip", "identify", "before_send"} else f"`{ENV_VARS[name]}`"
        assert variable == expected, name
    defaults = make_config({"service_token": TOKEN})
    for name in ("batch_size", "queue_size", "max_inflight", "retries", "max_body_bytes"):
        assert rows[name][1].strip("`").replace("_", "") == str(getattr(defaults, name)), name
