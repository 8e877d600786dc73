"""The ALF collector service: receive, validate and store ALF, and answer queries about it.

It speaks the Galileo collector protocol (``POST /:version/single`` and ``/:version/batch``
for ALF 1.0.0 and 1.1.0, plain, gzip or deflate bodies, answers ``{"errors": [...], "sent":
N, "saved": M}``), stores each valid entry once in SQLite or PostgreSQL, and serves a read
API (``/api/...``) and a dashboard. :func:`create_app` builds the ASGI app;
``alf-analytics collector`` serves it with uvicorn; :class:`Collector` runs it in a thread
for tests and local runs::

    with Collector() as collector:
        ...  # point the agent at collector.url
        assert collector.wait_for_entries(3)
        [entry.status for entry in collector.entries(service_token="my-token")]

Needs the ``collector`` extra: ``pip install 'alf-analytics[collector]'`` (and
``'alf-analytics[postgres]'`` for PostgreSQL).
"""

from __future__ import annotations

from .app import RequestRecord, create_app
from .server import Collector, StoredEntry
from .settings import SUPPORTED_VERSIONS, CollectorError, Limits
from .summary import Summary, SummaryRow, summarize

__all__ = [
    "SUPPORTED_VERSIONS",
    "Collector",
    "CollectorError",
    "Limits",
    "RequestRecord",
    "StoredEntry",
    "Summary",
    "SummaryRow",
    "create_app",
    "summarize",
]
