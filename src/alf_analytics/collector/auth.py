"""Who may read: the read key, as ``Authorization: Bearer KEY`` or the dashboard's cookie.

The cookie (``alf_read``, set by the dashboard's ``/login``) holds
``HMAC-SHA256(read key, "alf-analytics read cookie v1")`` in hex: never the key itself, the
same in every collector process sharing the key (so it works behind a load balancer and
across restarts), and invalid as soon as the key changes. Comparisons are constant-time.

A service token never grants read access (it is answered 403), and the read key never lets
anyone write (ingest only accepts the configured service tokens).
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Final

from starlette.requests import HTTPConnection

from .settings import TokenSet

__all__ = [
    "COOKIE_NAME",
    "ReadAccess",
    "make_read_cookie",
    "read_allowed",
    "read_key_configured",
    "read_key_matches",
    "read_refusal",
]

COOKIE_NAME: Final = "alf_read"
_COOKIE_CONTEXT: Final = b"alf-analytics read cookie v1"


def cookie_value(key: str) -> str:
    """The cookie value that stands for ``key``."""
    return hmac.new(key.encode("utf-8"), _COOKIE_CONTEXT, hashlib.sha256).hexdigest()


class ReadAccess:
    """The read side of a collector's access control (``app.state.read_access``)."""

    def __init__(self, read_key: str | None, tokens: TokenSet) -> None:
        self.read_key = read_key or None
        self.tokens = tokens
        self._cookie = cookie_value(read_key) if read_key else ""

    def key_matches(self, candidate: str) -> bool:
        if not self.read_key:
            return False
        return hmac.compare_digest(candidate.encode("utf-8", "replace"), self.read_key.encode())

    def cookie_matches(self, candidate: str) -> bool:
        return bool(self._cookie) and hmac.compare_digest(
            candidate.encode("utf-8", "replace"), self._cookie.encode()
        )

    def refusal(self, connection: HTTPConnection) -> tuple[int, str] | None:
        """``None`` when the request may read, else (401 or 403, why)."""
        if not self.read_key:
            return None
        header = connection.headers.get("authorization")
        if header is not None:
            scheme, _, credentials = _as_sent(header).partition(" ")
            credentials = credentials.strip()
            if scheme.lower() == "bearer" and credentials:
                if self.key_matches(credentials):
                    return None
                if self.tokens.is_service_token(credentials):
                    return 403, "a service token does not grant read access: use the read key"
                return 401, "wrong read key"
        cookie = connection.cookies.get(COOKIE_NAME)
        if cookie is not None and self.cookie_matches(cookie):
            return None
        return 401, "this collector needs its read key: send Authorization: Bearer <read key>"


def _as_sent(value: str) -> str:
    """A header value in the characters its client wrote: the server hands its bytes over
    decoded as Latin-1, so a read key typed in UTF-8 (``clé``) arrives as ``clÃ©`` and
    could never match; bytes that are not UTF-8 stay as they were read."""
    if value.isascii():
        return value
    try:
        return value.encode("latin-1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return value


def _access(connection: HTTPConnection) -> ReadAccess:
    access: ReadAccess = connection.app.state.read_access
    return access


def read_allowed(connection: HTTPConnection) -> bool:
    """Whether the request may read (always, when no read key is configured)."""
    return _access(connection).refusal(connection) is None


def read_refusal(connection: HTTPConnection) -> tuple[int, str] | None:
    """Why the request may not read: (401 or 403, message), or ``None`` when it may."""
    return _access(connection).refusal(connection)


def read_key_configured(connection: HTTPConnection) -> bool:
    return bool(_access(connection).read_key)


def read_key_matches(connection: HTTPConnection, candidate: str) -> bool:
    """Whether ``candidate`` (typed on the login page) is the read key (constant time)."""
    return _access(connection).key_matches(candidate)


def make_read_cookie(connection: HTTPConnection) -> str:
    """The ``alf_read`` cookie value for this collector's read key (never the key itself)."""
    key = _access(connection).read_key
    if not key:
        raise ValueError("no read key is configured")
    return cookie_value(key)
