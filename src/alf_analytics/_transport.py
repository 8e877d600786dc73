"""The transport: one long-lived ``httpx.Client`` that POSTs gzip batches to the collector.

It only moves bytes and reports what happened; what to do about it (retry, split, give up) is
the worker's decision.
"""

from __future__ import annotations

import email.utils
import gzip
import time
from dataclasses import dataclass
from typing import Protocol

import httpx

from ._version import __version__

USER_AGENT = f"alf-analytics/{__version__}"
# Level 1 compresses repetitive ALF JSON ~10:1 at a fraction of level 9's CPU cost.
GZIP_LEVEL = 1


@dataclass(frozen=True)
class Outcome:
    """What the collector answered (``status`` 0 means no answer: a network error)."""

    status: int
    body: bytes = b""
    retry_after: float | None = None
    error: str | None = None
    #: True when the request may have reached the collector (a timeout after sending).
    maybe_delivered: bool = False


class Transport(Protocol):
    """Sends one request body (a JSON array of ALF objects) to the collector."""

    def send(self, payload: bytes) -> Outcome: ...

    def close(self) -> None: ...


def parse_retry_after(value: str | None) -> float | None:
    """``Retry-After`` as seconds from now: delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class HTTPTransport:
    """POST ``{collector_url}/1.1.0/batch`` with ``Content-Encoding: gzip``."""

    def __init__(self, collector_url: str, *, timeout: float, alf_version: str = "1.1.0") -> None:
        self.url = f"{collector_url}/{alf_version}/batch"
        self._timeout = httpx.Timeout(timeout, connect=min(timeout, 5.0))
        self._client: httpx.Client | None = None

    def _get_client(self) -> httpx.Client:
        if self._client is None:
            self._client = httpx.Client(
                timeout=self._timeout,
                headers={
                    "User-Agent": USER_AGENT,
                    "Content-Type": "application/json",
                    "Content-Encoding": "gzip",
                },
                # The collector URL is explicit; proxy settings from the environment would
                # silently reroute loopback collectors.
                trust_env=False,
                follow_redirects=False,
            )
        return self._client

    def send(self, payload: bytes) -> Outcome:
        body = gzip.compress(payload, compresslevel=GZIP_LEVEL, mtime=0)
        client = self._get_client()
        try:
            response = client.post(self.url, content=body)
        except httpx.TimeoutException as exc:
            # A read or write timeout leaves the outcome unknown: the batch may have arrived.
            sent = not isinstance(exc, (httpx.ConnectTimeout, httpx.PoolTimeout))
            return Outcome(0, error=f"{type(exc).__name__}: {exc}", maybe_delivered=sent)
        except httpx.HTTPError as exc:
            return Outcome(0, error=f"{type(exc).__name__}: {exc}", maybe_delivered=False)
        return Outcome(
            response.status_code,
            response.content,
            parse_retry_after(response.headers.get("retry-after")),
        )

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.close()
