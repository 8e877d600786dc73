"""alf-analytics: API traffic analytics for any Python web app, as ALF, in one middleware.

- WSGI (Flask, any WSGI app): :class:`AnalyticsWSGIMiddleware`
- ASGI (Starlette, FastAPI, any ASGI app): :class:`AnalyticsASGIMiddleware`
- Django: ``"alf_analytics.django.AnalyticsMiddleware"`` in ``MIDDLEWARE``

Entries are batched per (service token, environment) by a background worker and sent to an ALF
collector. :func:`flush`, :func:`close` and :func:`stats` control and observe that worker;
:func:`set_consumer` names the caller of the current request; :func:`install_sigterm_flush`
flushes at SIGTERM for servers that skip ``atexit``. :class:`Options` types every option.
"""

from __future__ import annotations

from ._config import (
    DEFAULT_LOG_BODY_TYPES,
    DEFAULT_REDACT_BODY_KEYS,
    DEFAULT_REDACT_HEADERS,
    DEFAULT_REDACT_KEY_SUBSTRINGS,
    DEFAULT_REDACT_QUERY,
    REDACTED,
)
from ._consumer import set_consumer
from ._options import Options
from ._signals import install_sigterm_flush
from ._version import __version__
from ._worker import close, flush, stats
from .asgi import AnalyticsASGIMiddleware
from .wsgi import AnalyticsWSGIMiddleware

__all__ = [
    "DEFAULT_LOG_BODY_TYPES",
    "DEFAULT_REDACT_BODY_KEYS",
    "DEFAULT_REDACT_HEADERS",
    "DEFAULT_REDACT_KEY_SUBSTRINGS",
    "DEFAULT_REDACT_QUERY",
    "REDACTED",
    "AnalyticsASGIMiddleware",
    "AnalyticsWSGIMiddleware",
    "Options",
    "__version__",
    "close",
    "flush",
    "install_sigterm_flush",
    "set_consumer",
    "stats",
]
