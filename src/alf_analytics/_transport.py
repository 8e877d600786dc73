"""The transport: one long-lived ``httpx.Client`` that POSTs gzip batches to the collector.

It only moves bytes and reports what happened; what to do about it (retry, split, give up) is
the worker's decision.
"""

from __future__ import annotations

import email.utils
import gzip
import re
import time
from dataclasses import dataclass
from datetime import timezone
from typing import Protocol

import httpx

from ._version import __version__

USER_AGENT = f"alf-analytics/{__version__}"
# Level 1 compresses repetitive ALF JSON ~10:1 at a fraction of level 9's CPU cost.
GZIP_LEVEL = 1
#: How much of the collector's answer is kept (for log lines).
MAX_ANSWER_BYTES = 65_536


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
    """``Retry-After`` as seconds from now: delta-seconds or an HTTP date; None when unusable."""
    if not value:
        return None
    value = value.strip()
    if _DELTA_SECONDS.fullmatch(value):
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:  # "-0000" and obsolete zones: RFC 9110 dates are always GMT
        when = when.replace(tzinfo=timezone.utc)
    try:
        return max(0.0, when.timestamp() - time.time())
    except (OverflowError, OSError, ValueError):
        return None


_DELTA_SECONDS = re.compile(r"[0-9]{1,12}(?:\.[0-9]{1,6})?")


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
            with client.stream("POST", self.url, content=body) as response:
                # The answer only feeds log lines: read at most MAX_ANSWER_BYTES of it (a longer
                # answer costs its connection, which is then not reused).
                answer = bytearray()
                for chunk in response.iter_bytes():
                    answer += chunk
                    if len(answer) >= MAX_ANSWER_BYTES:
                        del answer[MAX_ANSWER_BYTES:]
                        break
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            # Nothing was sent: the collector cannot have seen this batch.
            return Outcome(0, error=f"{type(exc).__name__}: {exc}", maybe_delivered=False)
        except httpx.HTTPError as exc:
            # A read timeout, a reset or a connection closed mid-response after the request was
            # written: the outcome is unknown, the collector may have stored the batch.
            return Outcome(0, error=f"{type(exc).__name__}: {exc}", maybe_delivered=True)
        return Outcome(
            response.status_code,
            bytes(answer),
            parse_retry_after(response.headers.get("retry-after")),
        )

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.close()
