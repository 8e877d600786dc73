"""alf-analytics: API traffic analytics for any Python web app, as ALF, in one middleware.

- WSGI (Flask, any WSGI app): :class:`AnalyticsWSGIMiddleware`
- ASGI (Starlette, FastAPI, any ASGI app): :class:`AnalyticsASGIMiddleware`
- Django: ``"alf_analytics.django.AnalyticsMiddleware"`` in ``MIDDLEWARE``

Entries are batched per (service token, environment) by a background worker and sent to an ALF
collector. :func:`flush`, :func:`close` and :func:`stats` control and observe that worker.
"""

from __future__ import annotations

from ._config import DEFAULT_REDACT_HEADERS
from ._version import __version__
from ._worker import close, flush, stats
from .asgi import AnalyticsASGIMiddleware
from .wsgi import AnalyticsWSGIMiddleware

__all__ = [
    "DEFAULT_REDACT_HEADERS",
    "AnalyticsASGIMiddleware",
    "AnalyticsWSGIMiddleware",
    "__version__",
    "close",
    "flush",
    "stats",
]
