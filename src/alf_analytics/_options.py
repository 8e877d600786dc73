"""The one definition of every option, shared by the three adapters.

:class:`Options` types the keyword arguments of :class:`~alf_analytics.AnalyticsWSGIMiddleware`
and :class:`~alf_analytics.AnalyticsASGIMiddleware` (``**options: Unpack[Options]``) and
Django's ``settings.ALF_ANALYTICS`` dict, so editors complete the names, type checkers check the
values, and ``app.add_middleware(AnalyticsASGIMiddleware, service_token=...)`` type-checks.
:func:`alf_analytics._config.make_config` validates the same names at run time; a test keeps the
two in step.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any, Literal, TypedDict

#: What a per-request callable receives: the framework's request object (Werkzeug/Flask
#: ``Request``, Starlette ``Request``, Django ``HttpRequest``), or the WSGI environ / ASGI scope
#: when the framework is not installed. Typed ``Any`` so one callable fits every adapter.
Request = Any

LogBody = bool | Literal["request", "response"]
ClientIP = Literal["full", "anonymized", "none"]
ForwardedHeader = Literal["x-forwarded-for", "forwarded"]
SkipPath = str | re.Pattern[str]


class Options(TypedDict, total=False):
    """Every option of alf-analytics; each is optional and falls back to ``ALF_<NAME>``."""

    # Where entries go and under which name.
    service_token: str | Callable[[Request], str | None] | None
    environment: str | Callable[[Request], str | None] | None
    collector_url: str
    require_token: bool
    enabled: bool
    # What is recorded.
    log_body: LogBody
    log_body_types: Iterable[str]
    max_body_bytes: int
    skip_paths: Iterable[SkipPath]
    skip_methods: Iterable[str]
    skip: Callable[[Request], bool] | None
    sample_rate: float
    identify: Callable[[Request], str | None] | None
    # What is redacted before anything is queued.
    redact_headers: Iterable[str]
    redact_query: Iterable[str]
    redact_body_keys: Iterable[str]
    default_redactions: bool
    client_ip: ClientIP
    trusted_proxies: Iterable[str]
    forwarded_header: ForwardedHeader
    before_send: Callable[[dict[str, Any]], dict[str, Any] | None] | None
    # Delivery: the worker shared by every middleware sending to one collector.
    batch_size: int
    delay: float
    max_batch_bytes: int
    queue_size: int
    max_queue_bytes: int
    max_inflight: int
    timeout: float
    retries: int
    retry_backoff: float
    shutdown_timeout: float
    debug: bool


OPTION_NAMES: frozenset[str] = frozenset(Options.__annotations__)
