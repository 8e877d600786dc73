"""Configuration: every option, its default, its environment fallback and its validation.

All validation happens here, once, when a middleware is constructed; the request path only
reads the frozen :class:`Config`.
"""

from __future__ import annotations

import ipaddress
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

DEFAULT_COLLECTOR_URL = "https://collector.galileo.mashape.com"
DEFAULT_REDACT_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie", "set-cookie"})
REDACTED = "[REDACTED]"

#: Option name -> environment variable consulted when the option is not given.
ENV_VARS = {
    "service_token": "ALF_SERVICE_TOKEN",
    "environment": "ALF_ENVIRONMENT",
    "collector_url": "ALF_COLLECTOR_URL",
    "log_body": "ALF_LOG_BODY",
}

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def mask_token(token: str) -> str:
    """Show a service token in messages without disclosing it."""
    if len(token) <= 8:
        return "***"
    return f"***{token[-4:]}"


@dataclass(frozen=True, eq=False)
class Config:
    """The validated options of one middleware instance. Build it with :func:`make_config`."""

    service_token: str
    environment: str | None = None
    collector_url: str = DEFAULT_COLLECTOR_URL
    log_body: bool = False
    batch_size: int = 100
    delay: float = 2.0
    max_batch_bytes: int = 1_000_000
    max_body_bytes: int = 65_536
    queue_size: int = 10_000
    timeout: float = 10.0
    retries: int = 5
    retry_backoff: float = 1.0
    shutdown_timeout: float = 5.0
    redact_headers: frozenset[str] = DEFAULT_REDACT_HEADERS
    trusted_proxies: tuple[IPNetwork, ...] = ()
    #: ``(service_token, environment)``: entries are batched per group, never mixed.
    group: tuple[str, str | None] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "group", (self.service_token, self.environment))

    def __repr__(self) -> str:
        return (
            f"Config(service_token={mask_token(self.service_token)!r}, "
            f"environment={self.environment!r}, collector_url={self.collector_url!r})"
        )


def _bad(name: str, value: object, expected: str) -> ValueError:
    shown = mask_token(value) if name == "service_token" and isinstance(value, str) else value
    return ValueError(f"alf_analytics: option {name}={shown!r} is invalid: {expected}")


def _check_type(name: str, value: object, types: type | tuple[type, ...], expected: str) -> None:
    # bool is an int subclass; a stray True must not pass as batch_size=1.
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise TypeError(f"alf_analytics: option {name} must be {expected}, got a bool")
    if not isinstance(value, types):
        raise TypeError(
            f"alf_analytics: option {name} must be {expected}, got {type(value).__name__}"
        )


def _int(name: str, value: object, minimum: int) -> int:
    _check_type(name, value, int, "an int")
    assert isinstance(value, int)
    if value < minimum:
        raise _bad(name, value, f"must be >= {minimum}")
    return value


def _seconds(name: str, value: object, *, allow_zero: bool = False) -> float:
    _check_type(name, value, (int, float), "a number of seconds")
    assert isinstance(value, (int, float))
    number = float(value)
    if math.isnan(number) or math.isinf(number) or number < 0 or (number == 0 and not allow_zero):
        raise _bad(name, value, "must be a positive, finite number of seconds")
    return number


def _bool_from_env(name: str, raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off", ""}:
        return False
    raise _bad(name, raw, "must be true/false (from the environment)")


def _collector_url(value: object) -> str:
    _check_type("collector_url", value, str, "a string")
    assert isinstance(value, str)
    url = value.strip().rstrip("/")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError as exc:
        raise _bad("collector_url", value, f"not a URL ({exc})") from None
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise _bad("collector_url", value, "must be an absolute http:// or https:// URL")
    if parts.query or parts.fragment:
        raise _bad("collector_url", value, "must not have a query string or fragment")
    return url


def _redact(value: object) -> frozenset[str]:
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise TypeError("alf_analytics: option redact_headers must be an iterable of header names")
    names = set()
    for item in value:
        if not isinstance(item, str) or not item.strip():
            raise _bad("redact_headers", item, "header names must be non-empty strings")
        names.add(item.strip().lower())
    # The given set replaces the defaults (so [] turns redaction off); extend it with
    # [*DEFAULT_REDACT_HEADERS, "x-api-key"] to keep credentials redacted.
    return frozenset(names)


def _proxies(value: object) -> tuple[IPNetwork, ...]:
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise TypeError(
            "alf_analytics: option trusted_proxies must be an iterable of IP addresses or networks"
        )
    networks = []
    for item in value:
        try:
            networks.append(ipaddress.ip_network(str(item), strict=False))
        except ValueError:
            raise _bad("trusted_proxies", item, "not an IP address or CIDR network") from None
    return tuple(networks)


_VALIDATORS: dict[str, Any] = {
    "log_body": None,  # handled inline
    "batch_size": lambda v: _int("batch_size", v, 1),
    "delay": lambda v: _seconds("delay", v),
    "max_batch_bytes": lambda v: _int("max_batch_bytes", v, 1024),
    "max_body_bytes": lambda v: _int("max_body_bytes", v, 0),
    "queue_size": lambda v: _int("queue_size", v, 1),
    "timeout": lambda v: _seconds("timeout", v),
    "retries": lambda v: _int("retries", v, 0),
    "retry_backoff": lambda v: _seconds("retry_backoff", v, allow_zero=True),
    "shutdown_timeout": lambda v: _seconds("shutdown_timeout", v, allow_zero=True),
    "redact_headers": _redact,
    "trusted_proxies": _proxies,
}

OPTION_NAMES = frozenset({"service_token", "environment", "collector_url", *_VALIDATORS.keys()})


def make_config(options: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> Config:
    """Validate ``options`` (keyword arguments or Django's ``ALF_ANALYTICS``) into a Config.

    Missing ``service_token``, ``environment``, ``collector_url`` and ``log_body`` fall back to
    the ``ALF_*`` environment variables. Raises ``TypeError``/``ValueError`` naming the option.
    """
    env = os.environ if environ is None else environ
    unknown = set(options) - OPTION_NAMES
    if unknown:
        raise TypeError(
            f"alf_analytics: unknown option(s) {', '.join(sorted(unknown))}; "
            f"valid options are {', '.join(sorted(OPTION_NAMES))}"
        )
    values: dict[str, Any] = {}

    token = options.get("service_token")
    if token is None:
        token = env.get(ENV_VARS["service_token"])
    if token is None:
        raise ValueError(
            "alf_analytics: option service_token is required "
            "(pass service_token=... or set ALF_SERVICE_TOKEN)"
        )
    _check_type("service_token", token, str, "a string")
    if not token.strip():
        raise ValueError("alf_analytics: option service_token must not be empty")
    values["service_token"] = token.strip()

    environment = options.get("environment")
    if environment is None:
        environment = env.get(ENV_VARS["environment"])
    if environment is not None:
        _check_type("environment", environment, str, "a string")
        # An empty environment means "none": ALF leaves the field out rather than sending "".
        environment = environment.strip() or None
    values["environment"] = environment

    url = options.get("collector_url")
    if url is None:
        url = env.get(ENV_VARS["collector_url"], DEFAULT_COLLECTOR_URL)
    values["collector_url"] = _collector_url(url)

    log_body = options.get("log_body")
    if log_body is None:
        raw = env.get(ENV_VARS["log_body"])
        log_body = _bool_from_env("log_body", raw) if raw is not None else False
    if not isinstance(log_body, bool):
        raise TypeError(
            f"alf_analytics: option log_body must be a bool, got {type(log_body).__name__}"
        )
    values["log_body"] = log_body

    for name, validate in _VALIDATORS.items():
        if validate is not None and options.get(name) is not None:
            values[name] = validate(options[name])
    return Config(**values)
