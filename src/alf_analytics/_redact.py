"""Redaction and body decoding, applied by the builder before an entry is queued.

Headers: a redacted header keeps its name and gets the marker as its value (Authorization and
Proxy-Authorization keep a known scheme: ``Bearer [REDACTED]``). Query parameters and JSON and
form-encoded body fields: matching keys keep their place, their values become the marker.
Keys match case-insensitively, ignoring ``-`` and ``_`` (so ``api_key`` also catches
``apiKey`` and ``API-KEY``). A JSON or form body that might hold a redacted key but cannot be
parsed, or was cut at ``max_body_bytes``, is left out rather than sent half-redacted.
"""

from __future__ import annotations

import json
import re
import zlib
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import unquote_plus

from ._config import REDACTED

if TYPE_CHECKING:
    from ._config import Config

#: Authorization schemes kept in front of the marker (IANA's registry and common others).
#: Any other first word may be part of the secret, so the whole value is replaced.
AUTH_SCHEMES = frozenset(
    {
        "basic",
        "bearer",
        "concealed",
        "digest",
        "dpop",
        "gnap",
        "hoba",
        "mutual",
        "negotiate",
        "ntlm",
        "oauth",
        "privatetoken",
        "scram-sha-1",
        "scram-sha-256",
        "vapid",
        "aws4-hmac-sha256",
        "hawk",
        "token",
        "apikey",
    }
)
_AUTH_HEADERS = frozenset({"authorization", "proxy-authorization"})
#: Headers whose value is a URL that may carry the same secrets as the request's own URL (an
#: OAuth callback's ``?code=`` in ``Location``, a page's ``?token=`` in ``Referer``).
_URL_HEADERS = frozenset(
    {"referer", "location", "content-location", "x-original-url", "x-forwarded-uri"}
)
#: ``scheme://user:password@`` at the start of a URL: up to the authority's last ``@`` (a
#: password may hold a raw one), the authority ending at ``/``, ``?`` or ``#``.
_USERINFO = re.compile(r"^(\s*[A-Za-z][A-Za-z0-9+.\-]*://)[^/?#]*@")
_REDACTED_IN_URL = "%5BREDACTED%5D"  # '[' and ']' may not appear unescaped in a query
_REDACTED_BYTES = _REDACTED_IN_URL.encode("ascii")

BodyKind = Literal["json", "form", "other"]


def normalized(key: str) -> str:
    """The form keys are compared in: lower case, without ``-`` and ``_``."""
    return key.lower().replace("-", "").replace("_", "")


def body_kind(mime_type: str) -> BodyKind:
    """Whether a ``Content-Type`` names JSON (``*/json``, ``*+json``), a form, or other."""
    essence = mime_type.partition(";")[0].strip().lower()
    if essence.endswith(("/json", "+json")):
        return "json"
    if essence == "application/x-www-form-urlencoded":
        return "form"
    return "other"


class Redactor:
    """The redaction rules of one :class:`~alf_analytics._config.Config`, ready to apply."""

    __slots__ = (
        "header_names",
        "header_substrings",
        "query_keys",
        "body_keys",
        "_json_keys",
        "_form_keys",
        "_fold_unsafe",
        "_safe_keys",
    )

    def __init__(self, config: Config) -> None:
        self.header_names: frozenset[str] = frozenset(n.lower() for n in config.redact_headers)
        self.header_substrings: tuple[str, ...] = tuple(
            sorted(s.lower() for s in config.redact_header_substrings)
        )
        self.query_keys = frozenset(normalized(k) for k in config.redact_query)
        self.body_keys = frozenset(normalized(k) for k in config.redact_body_keys)
        # What a body must contain (lower-cased, '-' and '_' removed) to possibly hold a key.
        needles = b"|".join(
            re.escape(key.encode("utf-8"))
            for key in sorted(self.body_keys, key=len, reverse=True)
            if key
        )
        self._json_keys = re.compile(b'"(?:' + needles + b')"') if needles else None
        self._form_keys = re.compile(b"(?:^|&)(?:" + needles + b")=") if needles else None
        # Non-ASCII keys fold differently in bytes: such a config always parses bodies.
        self._fold_unsafe = not all(key.isascii() for key in self.body_keys)
        #: JSON keys seen that are not redacted (bodies repeat their keys; bounded).
        self._safe_keys: set[str] = set()

    # -- headers -------------------------------------------------------------------------------

    def header(self, name: str, value: str) -> str:
        """The value to record for a header (``name`` lower-cased)."""
        if name not in self.header_names and not any(s in name for s in self.header_substrings):
            if name in _URL_HEADERS:
                return self.url(value)
            if name == "host" and "@" in value:
                # Userinfo has no place in a Host header, but a client may send it anyway.
                return _REDACTED_IN_URL + "@" + value.rpartition("@")[2]
            return value
        if name in _AUTH_HEADERS:
            scheme, space, _ = value.strip().partition(" ")
            if space and scheme.lower() in AUTH_SCHEMES:
                return f"{scheme} {REDACTED}"
        return REDACTED

    def url(self, value: str) -> str:
        """A URL-valued header (``Referer``, ``Location``...) with its secrets replaced.

        Userinfo (``user:password@``) always; query parameter values as ``redact_query``
        says, as in ``request.url``, and so in a fragment of ``name=value`` pairs (an OAuth
        implicit grant redirects to ``...#access_token=...``). The rest is kept as it was.
        """
        if "@" in value:
            value = _USERINFO.sub(r"\1" + _REDACTED_IN_URL + "@", value, count=1)
        if "?" not in value and "=" not in value:
            return value
        base, hash_, fragment = value.partition("#")
        base, question, query = base.partition("?")
        if question:
            base += "?" + self._params(query)
        if hash_:
            base += "#" + (self._params(fragment) if "=" in fragment else fragment)
        return base

    def _params(self, query: str) -> str:
        marks = []
        for index, part in enumerate(query.split("&")):
            name = part.partition("=")[0]
            if "%" in name or "+" in name:
                name = unquote_plus(name, errors="replace")
            marks.append((index, self.query_key(name)))
        return redacted_query(query, marks)

    # -- query string --------------------------------------------------------------------------

    def query_key(self, name: str) -> bool:
        """Whether a (decoded) query parameter name is redacted."""
        return _key_in(name, self.query_keys)

    # -- bodies --------------------------------------------------------------------------------

    def may_hold_key(self, data: bytes, kind: BodyKind) -> bool:
        """False when no redacted key can appear in ``data`` (a cheap, conservative scan).

        Every key of a JSON document is a run between two quotes, and every key of a form
        between ``&`` (or the start) and ``=``: once ASCII is folded the way keys are compared
        (lower case, ``-`` and ``_`` removed), one regular-expression search over the folded
        bytes finds each key that could match, with no parse. Escapes (``\\`` in JSON,
        ``%`` and ``+`` in a form) could spell a key in disguise, and a form name may nest one
        in brackets (``user[password]``): then the body is parsed.
        """
        if self._json_keys is None or self._form_keys is None:
            return False
        if self._fold_unsafe:
            return True
        if kind == "json":
            if b"\\" in data:
                return True
            pattern = self._json_keys
        else:
            if b"%" in data or b"+" in data or b"[" in data:
                return True
            pattern = self._form_keys
        return pattern.search(data.translate(_FOLD, b"-_")) is not None

    def body(self, data: bytes, kind: BodyKind) -> bytes | None:
        """``data`` with redacted keys' values replaced, or None when it cannot be parsed.

        A JSON body is always parsed (a body labelled JSON that is not JSON is left out, since
        its secrets could be anywhere), but walked only when a key may match.
        """
        if kind == "other":
            return data
        if kind == "form":
            return self._form(data) if self.may_hold_key(data, kind) else data
        try:
            document = _loads(data)
        except (ValueError, RecursionError):
            return None
        if not self.may_hold_key(data, kind) or not self._scrub(document):
            return data
        try:
            return _dumps(document)
        except (ValueError, TypeError, RecursionError):
            return None

    def _scrub(self, document: Any) -> bool:
        """Replace redacted keys' values in place, at any depth; True if any was."""
        changed = False
        stack = [document]
        safe = self._safe_keys
        while stack:
            node = stack.pop()
            if type(node) is dict:
                if not safe.issuperset(node):  # records repeat their keys: one C-level check
                    for key in list(node):
                        if normalized(key) in self.body_keys:
                            node[key] = REDACTED
                            changed = True
                        elif len(safe) < 4096:
                            safe.add(key)
                stack.extend([v for v in node.values() if type(v) is dict or type(v) is list])
            elif type(node) is list:
                stack.extend([v for v in node if type(v) is dict or type(v) is list])
        return changed

    def _form(self, data: bytes) -> bytes:
        parts = data.split(b"&")
        changed = False
        for index, part in enumerate(parts):
            name, equals, _ = part.partition(b"=")
            if not equals:
                continue
            decoded = unquote_plus(name.decode("latin-1"), encoding="utf-8", errors="replace")
            if _key_in(decoded, self.body_keys):
                parts[index] = name + b"=" + _REDACTED_BYTES
                changed = True
        return b"&".join(parts) if changed else data


_BRACKETS = re.compile(r"[\[\]]+")


def _key_in(name: str, keys: frozenset[str]) -> bool:
    """Whether a query or form name is one of ``keys`` (normalised), or holds one in brackets.

    PHP, Rails and jQuery's ``$.param`` write nested fields as ``user[password]`` and lists as
    ``token[]``: any bracketed part that matches redacts the value.
    """
    if normalized(name) in keys:
        return True
    if "[" in name:
        return any(normalized(part) in keys for part in _BRACKETS.split(name) if part)
    return False


def redacted_query(query: str, names: Iterable[tuple[int, bool]]) -> str:
    """``query`` with the values of the marked parameters replaced, its shape kept.

    ``names`` gives, for each ``&``-separated part that holds a parameter, its index and
    whether it is redacted.
    """
    parts = query.split("&")
    for index, redact in names:
        if redact:
            name, equals, _ = parts[index].partition("=")
            if equals:
                parts[index] = f"{name}={_REDACTED_IN_URL}"
    return "&".join(parts)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _std_loads(data: bytes) -> Any:
    return json.loads(data, parse_constant=_no_constant)


def _std_dumps(document: Any) -> bytes:
    try:
        return json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate escape (\ud800): keep it escaped
        return json.dumps(document, separators=(",", ":")).encode("ascii")


try:  # orjson: strict RFC 8259 parsing (no NaN, no lone surrogates), ~5x faster
    import orjson

    _loads: Callable[[bytes], Any] = orjson.loads
    _dumps: Callable[[Any], bytes] = orjson.dumps
except ImportError:  # pragma: no cover - interpreters without orjson
    _loads, _dumps = _std_loads, _std_dumps

_FOLD = bytes.maketrans(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ", b"abcdefghijklmnopqrstuvwxyz")


# -- Content-Encoding ------------------------------------------------------------------------


def decoded(data: bytes, encodings: str, limit: int) -> tuple[bytes, bool] | None:
    """The body under its ``Content-Encoding`` (gzip, deflate), at most ``limit`` bytes.

    Returns ``(body, complete)``, or None when an encoding is unknown (``br``, ``zstd``...) or
    the data is corrupt. Never produces more than ``limit`` bytes, whatever the ratio.
    """
    complete = True
    for coding in reversed([c.strip().lower() for c in encodings.split(",")]):
        if coding in ("", "identity"):
            continue
        if coding in ("gzip", "x-gzip"):
            result = _inflate(data, 16 + zlib.MAX_WBITS, limit)
        elif coding == "deflate":
            # RFC 9110 says zlib-wrapped; some servers send raw deflate.
            result = _inflate(data, zlib.MAX_WBITS, limit) or _inflate(data, -zlib.MAX_WBITS, limit)
        else:
            return None
        if result is None:
            return None
        data, layer_complete = result
        complete = complete and layer_complete
    return data, complete


def _inflate(data: bytes, wbits: int, limit: int) -> tuple[bytes, bool] | None:
    out = bytearray()
    rest = data
    try:
        while rest and len(out) <= limit:
            inflater = zlib.decompressobj(wbits)
            out += inflater.decompress(rest, limit + 1 - len(out))
            if not inflater.eof:
                # Input ran out (a captured prefix) or the output bound was reached.
                return bytes(out[:limit]), False
            rest = inflater.unused_data  # gzip may hold several members
            if wbits < 16 + zlib.MAX_WBITS:
                break
    except zlib.error:
        return None
    if len(out) > limit:
        return bytes(out[:limit]), False
    return bytes(out), not rest
