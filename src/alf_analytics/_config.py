"""Configuration: every option, its default, its environment variable and its validation.

All validation happens here, once, when a middleware is constructed; the request path only
reads the frozen :class:`Config`. The option names and types are defined once, in
:class:`alf_analytics._options.Options`; every option ``name`` can also come from the
environment variable ``ALF_<NAME>`` (lists comma-separated, booleans ``true``/``false``,
callables never), and an explicit argument always wins.
"""

from __future__ import annotations

import difflib
import inspect
import ipaddress
import logging
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from ._options import OPTION_NAMES, ClientIP, ForwardedHeader, LogBody, Request

__all__ = [
    "DEFAULT_COLLECTOR_URL",
    "DEFAULT_LOG_BODY_TYPES",
    "DEFAULT_REDACT_BODY_KEYS",
    "DEFAULT_REDACT_HEADERS",
    "DEFAULT_REDACT_HEADER_SUBSTRINGS",
    "DEFAULT_REDACT_KEY_SUBSTRINGS",
    "DEFAULT_REDACT_QUERY",
    "ENV_VARS",
    "OPTION_NAMES",
    "REDACTED",
    "Config",
    "make_config",
    "validate_option",
    "mask_token",
    "mask_url",
]

logger = logging.getLogger("alf_analytics")

#: Where ``alf-analytics collector`` listens by default: entries never go to a third party
#: unless ``collector_url`` says so.
DEFAULT_COLLECTOR_URL = "http://127.0.0.1:8700"
DEFAULT_REDACT_HEADERS = frozenset(
    {"authorization", "proxy-authorization", "cookie", "set-cookie", "x-api-key", "x-auth-token"}
)
#: A header whose (lower-cased) name contains one of these is redacted too (``signature``:
#: webhook HMACs such as ``X-Hub-Signature-256`` and ``Stripe-Signature``).
DEFAULT_REDACT_HEADER_SUBSTRINGS = frozenset(
    {"token", "secret", "password", "passwd", "api-key", "apikey", "session", "signature"}
)
#: A query parameter or form or JSON body key whose name, compared as keys are (lower case,
#: without ``-`` and ``_``), contains one of these is redacted too: ``new_password``,
#: ``auth_token``, ``x-api-key``, ``session_id``. In JSON only a string, array or object value
#: is replaced: ``"max_tokens": 100`` is a count, not a secret.
DEFAULT_REDACT_KEY_SUBSTRINGS = frozenset(
    {"token", "secret", "password", "passwd", "apikey", "session"}
)
DEFAULT_REDACT_BODY_KEYS = frozenset(
    {
        "password",
        "passwd",
        "pwd",
        "secret",
        "client_secret",
        "token",
        "access_token",
        "refresh_token",
        "id_token",
        "api_key",
        "apikey",
        "private_key",
        "authorization",
        "card_number",
        "cvv",
        "cvc",
        "ssn",
    }
)
#: Every body key is a secret in a query string too (``?client_secret=``, ``?refresh_token=``),
#: plus the signed-URL parameters of S3 and GCS and a few more that only URLs carry.
DEFAULT_REDACT_QUERY = DEFAULT_REDACT_BODY_KEYS | frozenset(
    {
        "key",
        "signature",
        "sig",
        "code",
        "session",
        "auth",
        "jwt",
        "x-amz-signature",
        "x-amz-security-token",
        "x-amz-credential",
        "x-goog-signature",
        "x-goog-credential",
    }
)
#: Bodies of these content types are captured when ``log_body`` asks for them. ``type/*`` and
#: ``*/*`` match any subtype, ``application/*+json`` any structured-syntax suffix.
#: ``text/event-stream`` is never matched by a wildcard: list it to capture event streams.
DEFAULT_LOG_BODY_TYPES = (
    "application/json",
    "application/*+json",
    "application/x-www-form-urlencoded",
    "application/xml",
    "application/*+xml",
    "text/*",
)
REDACTED = "[REDACTED]"
#: Room left in a batch for the rest of an entry (URL, headers, timings) beside its bodies.
ENTRY_OVERHEAD = 8192

#: Option name -> the environment variable read when the option is not given.
ENV_VARS = {name: f"ALF_{name.upper()}" for name in sorted(OPTION_NAMES)}
#: Options that cannot come from the environment (they are Python callables).
_CALLABLE_ONLY = frozenset({"skip", "identify", "before_send"})

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
_ENDPOINT_SUFFIX = re.compile(r"/1\.[01]\.0/(?:single|batch)$")
_NEVER_BY_WILDCARD = frozenset({"text/event-stream"})


def mask_token(token: object) -> str:
    """Show a service token in messages without disclosing it."""
    if not isinstance(token, str):
        return "<per-request>" if callable(token) else "<none>"
    if len(token) <= 8:
        return "***"
    return f"***{token[-4:]}"


def mask_url(url: str) -> str:
    """A URL fit for logs, errors and thread names: credentials in it replaced by ``***``.

    Also for a malformed one (no scheme, ``//user:pass@host``, ``http:/user:pass@host``):
    everything up to the last ``@`` before the query is taken as credentials.
    """
    prefix = _URL_PREFIX.match(url)
    start = prefix.end() if prefix else 0
    end = min((i for i in (url.find("?", start), url.find("#", start)) if i >= 0), default=None)
    at = url.rfind("@", start, end)
    if at < 0:
        return url
    return f"{url[:start]}***{url[at:]}"


#: A scheme (only when slashes follow it: ``user:pass@host`` has none) and the slashes.
_URL_PREFIX = re.compile(r"(?:[A-Za-z][A-Za-z0-9+.-]*:(?=/))?/*")


def _shown_token(value: object) -> str:
    if isinstance(value, str):
        return repr(mask_token(value))
    if value is None:
        return "None"
    if callable(value):
        return f"<function {getattr(value, '__qualname__', type(value).__name__)}>"
    return f"<{type(value).__name__}>"


@dataclass(frozen=True, eq=False)
class Config:
    """The validated options of one middleware instance. Build it with :func:`make_config`.

    Redaction sets are the effective ones (defaults included unless
    ``default_redactions=False``), lower-cased.
    """

    service_token: str | Callable[[Request], str | None] | None = None
    environment: str | Callable[[Request], str | None] | None = None
    collector_url: str = DEFAULT_COLLECTOR_URL
    require_token: bool = True
    enabled: bool = True
    log_body: LogBody = False
    log_body_types: tuple[str, ...] = DEFAULT_LOG_BODY_TYPES
    max_body_bytes: int = 65_536
    skip_paths: tuple[str | re.Pattern[str], ...] = ()
    skip_methods: frozenset[str] = frozenset()
    skip: Callable[[Request], bool] | None = None
    sample_rate: float = 1.0
    identify: Callable[[Request], str | None] | None = None
    redact_headers: frozenset[str] = DEFAULT_REDACT_HEADERS
    redact_header_substrings: frozenset[str] = DEFAULT_REDACT_HEADER_SUBSTRINGS
    redact_key_substrings: frozenset[str] = DEFAULT_REDACT_KEY_SUBSTRINGS
    redact_query: frozenset[str] = DEFAULT_REDACT_QUERY
    redact_body_keys: frozenset[str] = DEFAULT_REDACT_BODY_KEYS
    default_redactions: bool = True
    client_ip: ClientIP = "full"
    trusted_proxies: tuple[IPNetwork, ...] = ()
    forwarded_header: ForwardedHeader = "x-forwarded-for"
    before_send: Callable[[dict[str, Any]], dict[str, Any] | None] | None = None
    batch_size: int = 100
    delay: float = 2.0
    max_batch_bytes: int = 1_000_000
    queue_size: int = 10_000
    max_queue_bytes: int = 64 * 1024 * 1024
    max_inflight: int = 16
    timeout: float = 10.0
    retries: int = 5
    retry_backoff: float = 1.0
    shutdown_timeout: float = 5.0
    debug: bool = False
    #: The options given (by keyword or ``ALF_*`` variable) rather than left at their default.
    given: frozenset[str] = field(default=frozenset(), repr=False)

    #: False when the middleware passes everything through (``enabled=False``, or no token
    #: with ``require_token=False``): no worker, no entry, one log line at construction.
    active: bool = field(init=False)
    log_request_body: bool = field(init=False)
    log_response_body: bool = field(init=False)
    #: ``(service_token, environment)`` when both are static strings (or no environment).
    #: With a per-request callable the adapter resolves the group per request: use
    #: ``exchange.group``, which is always right.
    group: tuple[str, str | None] = field(init=False)
    #: True when a request must be looked at before deciding to record it.
    has_skip_rules: bool = field(init=False)
    _skip_exact: frozenset[str] = field(init=False, repr=False)
    _skip_prefixes: tuple[str, ...] = field(init=False, repr=False)
    _skip_patterns: tuple[re.Pattern[str], ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        put("active", self.enabled and self.service_token is not None)
        put("log_request_body", self.log_body in (True, "request"))
        put("log_response_body", self.log_body in (True, "response"))
        token = self.service_token if isinstance(self.service_token, str) else ""
        environment = self.environment if isinstance(self.environment, str) else None
        put("group", (token, environment))
        exact, prefixes, patterns = set(), [], []
        for rule in self.skip_paths:
            if isinstance(rule, re.Pattern):
                patterns.append(rule)
            elif rule.endswith("*"):
                prefixes.append(rule[:-1])
            else:
                exact.add(rule)
        put("_skip_exact", frozenset(exact))
        put("_skip_prefixes", tuple(prefixes))
        put("_skip_patterns", tuple(patterns))
        put("has_skip_rules", bool(self.skip_paths or self.skip_methods or self.skip))

    def __repr__(self) -> str:
        return (
            f"Config(service_token={_shown_token(self.service_token)}, "
            f"environment={self.environment!r}, collector_url={mask_url(self.collector_url)!r}, "
            f"enabled={self.enabled!r})"
        )

    def skips_path(self, path: str) -> bool:
        """Whether ``skip_paths`` excludes this (decoded) request path."""
        if path in self._skip_exact:
            return True
        for prefix in self._skip_prefixes:
            if path.startswith(prefix):
                return True
        for pattern in self._skip_patterns:
            if pattern.search(path):
                return True
        return False

    def body_type_allowed(self, content_type: str | bytes | None) -> bool:
        """Whether a body of this ``Content-Type`` may be captured (``log_body_types``)."""
        if isinstance(content_type, bytes):
            content_type = content_type.decode("latin-1")
        mime = (content_type or "").partition(";")[0].strip().lower()
        if not mime:
            # A body of no declared type: only "*/*" (everything) takes it.
            return "*/*" in self.log_body_types
        major, _, minor = mime.partition("/")
        for pattern in self.log_body_types:
            if pattern == mime:
                return True
            if mime in _NEVER_BY_WILDCARD:
                continue
            p_major, _, p_minor = pattern.partition("/")
            if p_major not in ("*", major):
                continue
            if p_minor == "*":
                return True
            if p_minor.startswith("*") and minor.endswith(p_minor[1:]):
                return True
        return False


# -- validation --------------------------------------------------------------------------------


#: Options whose raw text an error never shows (the token; a URL's credentials and query).
_MASKED_OPTIONS = frozenset({"service_token", "collector_url"})


class _Source:
    """Where a value came from: an explicit option, or an environment variable (named)."""

    __slots__ = ("name", "variable", "raw")

    def __init__(self, name: str, variable: str | None, raw: str | None = None) -> None:
        self.name = name
        self.variable = variable
        #: The environment variable's text, shown in errors rather than a parsed form of it.
        self.raw = raw

    def label(self, value: object) -> str:
        if self.variable and self.raw is not None and self.name not in _MASKED_OPTIONS:
            value = self.raw
        shown = _shown_token(value) if self.name == "service_token" else repr(value)
        if self.variable:
            return f"{self.variable}={shown} (the environment variable for option {self.name})"
        return f"option {self.name}={shown}"

    def bad(self, value: object, expected: str) -> ValueError:
        return ValueError(f"alf_analytics: {self.label(value)} is invalid: {expected}")

    def wrong_type(self, value: object, expected: str) -> TypeError:
        shown = "a bool" if isinstance(value, bool) else type(value).__name__
        return TypeError(f"alf_analytics: option {self.name} must be {expected}, got {shown}")


def _check_type(src: _Source, value: object, types: tuple[type, ...], expected: str) -> None:
    # bool is an int subclass; a stray True must not pass as batch_size=1.
    if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
        raise src.wrong_type(value, expected)


def _env_bool(src: _Source, raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off", ""}:
        return False
    raise src.bad(raw, "must be true or false")


def _env_number(src: _Source, raw: str, kind: type[int] | type[float]) -> int | float:
    try:
        return kind(raw.strip().replace("_", ""))
    except ValueError:
        raise src.bad(raw, "must be " + ("an integer" if kind is int else "a number")) from None


def _env_list(raw: str) -> list[str]:
    return [item.strip() for item in raw.split(",") if item.strip()]


def _boolean(src: _Source, value: object) -> bool:
    if isinstance(value, str) and src.variable:
        return _env_bool(src, value)
    _check_type(src, value, (bool,), "a bool")
    return bool(value)


def _integer(minimum: int) -> Callable[[_Source, object], int]:
    def validate(src: _Source, value: object) -> int:
        if isinstance(value, str) and src.variable:
            value = _env_number(src, value, int)
        _check_type(src, value, (int,), "an int")
        assert isinstance(value, int)
        if value < minimum:
            raise src.bad(value, f"must be >= {minimum}")
        return value

    return validate


#: The longest a duration option (and ``install_sigterm_flush``'s timeout) may be: a week.
#: Far beyond it, thread waits overflow (``threading.TIMEOUT_MAX``).
MAX_SECONDS = 7 * 86_400


def _seconds(allow_zero: bool) -> Callable[[_Source, object], float]:
    def validate(src: _Source, value: object) -> float:
        if isinstance(value, str) and src.variable:
            value = _env_number(src, value, float)
        _check_type(src, value, (int, float), "a number of seconds")
        assert isinstance(value, (int, float))
        number = float(value)
        if (
            not math.isfinite(number)
            or not 0 <= number <= MAX_SECONDS
            or (number == 0 and not allow_zero)
        ):
            low = ">= 0" if allow_zero else "> 0"
            raise src.bad(value, f"must be a finite number of seconds {low} and <= {MAX_SECONDS}")
        return number

    return validate


def _sample_rate(src: _Source, value: object) -> float:
    if isinstance(value, str) and src.variable:
        value = _env_number(src, value, float)
    _check_type(src, value, (int, float), "a number between 0 and 1")
    assert isinstance(value, (int, float))
    if not 0.0 <= float(value) <= 1.0:  # NaN fails this too
        raise src.bad(value, "must be between 0 and 1")
    return float(value)


def _text(src: _Source, value: object) -> str:
    _check_type(src, value, (str,), "a string")
    assert isinstance(value, str)
    return value.strip()


def _per_request(src: _Source, value: object) -> str | Callable[[Request], str | None] | None:
    """A string, or a callable of the request (service_token, environment)."""
    if callable(value) and not isinstance(value, str):
        function: Callable[[Request], str | None] = _sync_callable(src, value)
        return function
    _check_type(src, value, (str,), "a string or a callable of the request")
    assert isinstance(value, str)
    return value.strip()


def _sync_callable(src: _Source, value: object) -> Any:
    if value is None:
        return None
    if not callable(value):
        raise src.wrong_type(value, "a callable")
    target = getattr(value, "__call__", value)  # noqa: B004 - a callable object's method
    where = "on the worker thread" if src.name == "before_send" else "on the request path"
    if inspect.iscoroutinefunction(value) or inspect.iscoroutinefunction(target):
        raise src.bad(value, f"must be a plain function: it runs {where}, not awaited")
    try:
        signature = inspect.signature(value)
    except (TypeError, ValueError):  # a builtin without a signature: cannot tell, accept it
        return value
    try:
        signature.bind(None)
    except TypeError:
        # Said now, not as a TypeError at every request (logged once, the feature then off).
        argument = "the entry" if src.name == "before_send" else "the request"
        raise src.bad(value, f"must take one argument, {argument}; it runs {where}") from None
    return value


def _callable_only(src: _Source, value: object) -> Any:
    if src.variable:  # never reached: make_config does not read these from the environment
        raise src.bad(value, "cannot come from the environment")
    return _sync_callable(src, value)


def _collector_url(src: _Source, value: object) -> str:
    _check_type(src, value, (str,), "a string")
    assert isinstance(value, str)
    url = value.strip().rstrip("/")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError as exc:
        raise src.bad(mask_url(value), f"not a URL ({exc})") from None
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise src.bad(mask_url(value), "must be an absolute http:// or https:// URL")
    if any(ch.isspace() or ord(ch) < 0x20 or ord(ch) == 0x7F for ch in url):
        # urlsplit takes them; the request could never be sent (every batch would be lost).
        raise src.bad(mask_url(value), "must not hold spaces or control characters")
    if parts.query or parts.fragment:
        # The query may be a credential (?api_key=...): the error shows the URL without it.
        shown = mask_url(url.partition("?")[0].partition("#")[0]) + "?..."
        raise src.bad(shown, "must not have a query string or fragment")
    # The URL of an endpoint names its base: batches go to {base}/1.1.0/batch, never doubled.
    return _ENDPOINT_SUFFIX.sub("", url)


def _log_body(src: _Source, value: object) -> LogBody:
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in ("request", "response"):
            return "request" if lowered == "request" else "response"
        if src.variable and lowered in {"1", "true", "yes", "on", "0", "false", "no", "off", ""}:
            return _env_bool(src, value)
        raise src.bad(value, 'must be True, False, "request" or "response"')
    _check_type(src, value, (bool,), 'True, False, "request" or "response"')
    return bool(value)


def _names(
    kind: str, *, lower: bool = True, upper: bool = False
) -> Callable[[_Source, object], tuple[str, ...]]:
    def validate(src: _Source, value: object) -> tuple[str, ...]:
        if isinstance(value, str):
            if not src.variable:
                raise src.wrong_type(value, f"a list of {kind}, not one string")
            value = _env_list(value)
        if not isinstance(value, Iterable):
            raise src.wrong_type(value, f"a list of {kind}")
        names = []
        for item in value:
            if not isinstance(item, str) or not item.strip():
                raise src.bad(item, f"{kind} must be non-empty strings")
            name = item.strip()
            names.append(name.upper() if upper else name.lower() if lower else name)
        return tuple(dict.fromkeys(names))

    return validate


def _body_types(src: _Source, value: object) -> tuple[str, ...]:
    types = _names("content types")(src, value)
    for item in types:
        major, slash, minor = item.partition("/")
        wildcard_ok = minor == "*" or (minor.startswith("*+") and "*" not in minor[1:])
        if not slash or not major or not minor or ("*" in minor and not wildcard_ok):
            raise src.bad(
                item, 'content types look like "type/subtype", "type/*", "type/*+json" or "*/*"'
            )
    return types


def _skip_paths(src: _Source, value: object) -> tuple[str | re.Pattern[str], ...]:
    if isinstance(value, str):
        if not src.variable:
            raise src.wrong_type(value, "a list of paths or patterns, not one string")
        value = _env_list(value)
    if not isinstance(value, Iterable):
        raise src.wrong_type(value, "a list of paths or patterns")
    rules: list[str | re.Pattern[str]] = []
    for item in value:
        if isinstance(item, re.Pattern):
            if not isinstance(item.pattern, str):
                raise src.bad(item, "patterns must be str patterns (paths are text)")
            rules.append(item)
        elif isinstance(item, str) and item.startswith("/"):
            if "*" in item[:-1]:
                raise src.bad(item, 'only a trailing "*" is a wildcard; use re.compile(...)')
            rules.append(item)
        else:
            raise src.bad(item, 'paths start with "/" ("/health", "/static/*") or are re.compile')
    return tuple(rules)


def _skip_methods(src: _Source, value: object) -> frozenset[str]:
    return frozenset(_names("HTTP methods", upper=True)(src, value))


def _proxies(src: _Source, value: object) -> tuple[IPNetwork, ...]:
    if isinstance(value, str):
        if not src.variable:
            raise src.wrong_type(value, "an iterable of IP addresses or networks")
        value = _env_list(value)
    if not isinstance(value, Iterable):
        raise src.wrong_type(value, "an iterable of IP addresses or networks")
    networks = []
    for item in value:
        try:
            networks.append(ipaddress.ip_network(str(item).strip(), strict=False))
        except ValueError:
            raise src.bad(item, "not an IP address or CIDR network") from None
    return tuple(networks)


def _choice(*choices: str) -> Callable[[_Source, object], str]:
    def validate(src: _Source, value: object) -> str:
        if isinstance(value, str) and value.strip().lower() in choices:
            return value.strip().lower()
        raise src.bad(value, "must be one of " + ", ".join(repr(c) for c in choices))

    return validate


_Validator = Callable[[_Source, object], Any]

_VALIDATORS: dict[str, _Validator] = {
    "service_token": _per_request,
    "environment": _per_request,
    "collector_url": _collector_url,
    "require_token": _boolean,
    "enabled": _boolean,
    "log_body": _log_body,
    "log_body_types": _body_types,
    "max_body_bytes": _integer(0),
    "skip_paths": _skip_paths,
    "skip_methods": _skip_methods,
    "skip": _callable_only,
    "sample_rate": _sample_rate,
    "identify": _callable_only,
    "redact_headers": _names("header names"),
    "redact_query": _names("query parameter names"),
    "redact_body_keys": _names("body keys"),
    "default_redactions": _boolean,
    "client_ip": _choice("full", "anonymized", "none"),
    "trusted_proxies": _proxies,
    "forwarded_header": _choice("x-forwarded-for", "forwarded"),
    "before_send": _callable_only,
    "batch_size": _integer(1),
    "delay": _seconds(allow_zero=False),
    "max_batch_bytes": _integer(1024),
    "queue_size": _integer(1),
    "max_queue_bytes": _integer(8192),  # room for two entries at least (RAW_RECORD_BYTES)
    "max_inflight": _integer(1),
    "timeout": _seconds(allow_zero=False),
    "retries": _integer(0),
    "retry_backoff": _seconds(allow_zero=True),
    "shutdown_timeout": _seconds(allow_zero=True),
    "debug": _boolean,
}
assert set(_VALIDATORS) == OPTION_NAMES, set(_VALIDATORS) ^ OPTION_NAMES


def _largest_entry(values: Mapping[str, Any]) -> int:
    """Bytes the captured bodies of one entry can take in a batch (base64: 4 per 3 bytes)."""
    body = 4 * math.ceil(int(values["max_body_bytes"]) / 3)
    log_body = values["log_body"]
    directions = (log_body in (True, "request")) + (log_body in (True, "response"))
    return directions * body + ENTRY_OVERHEAD


def validate_option(name: str, value: object, environ: Mapping[str, str] | None = None) -> Any:
    """One option's validated value: ``value``, else ``ALF_<NAME>``, else its default."""
    env = os.environ if environ is None else environ
    if value is not None:
        return _VALIDATORS[name](_Source(name, None), value)
    if name not in _CALLABLE_ONLY and ENV_VARS[name] in env:
        return _VALIDATORS[name](
            _Source(name, ENV_VARS[name], env[ENV_VARS[name]]), env[ENV_VARS[name]]
        )
    return _defaults()[name]


def make_config(options: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> Config:
    """Validate ``options`` (keyword arguments, or Django's ``ALF_ANALYTICS``) into a Config.

    An option not given (or given as ``None``) is read from ``ALF_<NAME>`` in the environment.
    Raises ``TypeError``/``ValueError`` naming the option, or the environment variable.
    """
    env = os.environ if environ is None else environ
    unknown = set(options) - OPTION_NAMES
    if unknown:
        guesses = []
        for name in sorted(map(str, unknown)):
            close = difflib.get_close_matches(name, sorted(OPTION_NAMES), n=1)
            guesses.append(f"{name} (did you mean {close[0]}?)" if close else name)
        raise TypeError(
            f"alf_analytics: unknown option(s) {', '.join(guesses)}; "
            f"valid options are {', '.join(sorted(OPTION_NAMES))}"
        )
    values: dict[str, Any] = {}
    for name, validate in _VALIDATORS.items():
        value = options.get(name)
        if value is not None:
            values[name] = validate(_Source(name, None), value)
        elif name not in _CALLABLE_ONLY and ENV_VARS[name] in env:
            values[name] = validate(
                _Source(name, ENV_VARS[name], env[ENV_VARS[name]]), env[ENV_VARS[name]]
            )

    given = frozenset(values)
    for name in ("service_token", "environment"):
        # An empty string means "none" (for environment: the ALF leaves the field out).
        if values.get(name) == "":
            values[name] = None
    token_given = options.get("service_token")
    if isinstance(token_given, str) and not token_given.strip():
        # Given explicitly but blank: a mistake, not a request to run without a token.
        raise ValueError("alf_analytics: option service_token must not be empty")

    merged = {**_defaults(), **values}
    if merged["service_token"] is None and merged["enabled"] and merged["require_token"]:
        raise ValueError(
            "alf_analytics: option service_token is required (pass service_token=... or set "
            "ALF_SERVICE_TOKEN; require_token=False or ALF_REQUIRE_TOKEN=false runs the app "
            "without recording, enabled=False or ALF_ENABLED=false switches recording off)"
        )
    if merged["log_body"] and _largest_entry(merged) > merged["max_batch_bytes"]:
        need = _largest_entry(merged)
        raise ValueError(
            f"alf_analytics: option max_body_bytes={merged['max_body_bytes']} does not fit in "
            f"max_batch_bytes={merged['max_batch_bytes']}: bodies travel base64-encoded (4 bytes "
            f"per 3), so one entry with its captured bodies and {ENTRY_OVERHEAD} bytes for the "
            f"rest can reach {need} bytes and would always be dropped as too_large; raise "
            f"max_batch_bytes to at least {need} or lower max_body_bytes"
        )

    default_sets = merged["default_redactions"]
    for name, defaults in (
        ("redact_headers", DEFAULT_REDACT_HEADERS),
        ("redact_query", DEFAULT_REDACT_QUERY),
        ("redact_body_keys", DEFAULT_REDACT_BODY_KEYS),
    ):
        listed = frozenset(values.get(name, ()))
        values[name] = (defaults | listed) if default_sets else listed
    # The substring rules are no options: they come with the defaults, or not at all.
    for name, defaults in (
        ("redact_header_substrings", DEFAULT_REDACT_HEADER_SUBSTRINGS),
        ("redact_key_substrings", DEFAULT_REDACT_KEY_SUBSTRINGS),
    ):
        values[name] = defaults if default_sets else frozenset()
    config = Config(**values, given=given)
    if not config.active:
        _announce_off(config)
    elif config.debug:
        show_debug_lines()
    return config


class _DebugToStderr(logging.StreamHandler):  # type: ignore[type-arg]
    """debug=True in an app that configured no logging: our lines go to stderr.

    Once the app configures logging (a handler on the root logger), its handlers show them
    instead (the ``alf_analytics`` logger propagates), so nothing is printed twice.
    """

    def emit(self, record: logging.LogRecord) -> None:
        if not logging.getLogger().handlers:
            super().emit(record)


def show_debug_lines() -> None:
    """Make ``debug=True`` visible in an app that configured no logging (Python would show
    only warnings): the ``alf_analytics`` logger gets a stderr handler and level DEBUG.

    An app that configured logging keeps its levels; when they hide our debug lines, one
    warning says how to see them.
    """
    global _debug_hint_given
    if not logger.hasHandlers():
        handler = _DebugToStderr()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logger.addHandler(handler)
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.DEBUG)
    elif not logger.isEnabledFor(logging.DEBUG) and not _debug_hint_given:
        _debug_hint_given = True
        logger.warning(
            "alf_analytics: debug=True, but logging is configured and the alf_analytics logger "
            "is at %s: set it to DEBUG to see the debug lines "
            '(logging.getLogger("alf_analytics").setLevel(logging.DEBUG))',
            logging.getLevelName(logger.getEffectiveLevel()),
        )


_debug_hint_given = False


#: Reasons already logged: "recording is off" is said once per process, not per middleware.
_announced: set[str] = set()


def _announce_off(config: Config) -> None:
    reason = "disabled" if not config.enabled else "no-token"
    if reason in _announced:
        return
    _announced.add(reason)
    # A warning, not info: with no logging set up (gunicorn, uvicorn, a script) Python shows
    # only warnings, and the one line saying recording is off must be seen.
    if reason == "disabled":
        logger.warning("alf_analytics: recording is off (enabled=False); requests pass through")
    else:
        logger.warning(
            "alf_analytics: recording is off: no service_token (and require_token=False); "
            "requests pass through"
        )


def _defaults() -> dict[str, Any]:
    return {f.name: f.default for f in Config.__dataclass_fields__.values() if f.init}
