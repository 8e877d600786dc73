"""Redaction and body decoding, applied by the builder before an entry is queued.

Headers: a redacted header keeps its name and gets the marker as its value (Authorization and
Proxy-Authorization keep a known scheme: ``Bearer [REDACTED]``). Query parameters and JSON and
form-encoded body fields: matching keys keep their place, their values become the marker.
Keys match case-insensitively, ignoring ``-`` and ``_`` (so ``api_key`` also catches
``apiKey`` and ``API-KEY``); a key holding one of the configured substrings (``new_password``)
is redacted too, in JSON unless its value is a number, bool or null. A JSON or form body that
might hold a redacted key but cannot be parsed, or was cut at ``max_body_bytes``, is left out
rather than sent half-redacted.
"""

from __future__ import annotations

import json
import re
import zlib
from collections.abc import Callable, Iterable
from itertools import chain
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
    {"referer", "location", "content-location", "x-original-url", "x-forwarded-uri", "origin"}
)
#: ``scheme://user:password@`` at the start of a URL, or ``//user:password@`` (a
#: scheme-relative reference, valid in ``Location`` and ``Referer``): up to the authority's
#: last ``@`` (a password may hold a raw one), the authority ending at ``/``, ``?`` or ``#``.
_USERINFO = re.compile(r"^(\s*(?:[A-Za-z][A-Za-z0-9+.\-]*:)?//)[^/?#]*@")
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
        "key_substrings",
        "_form_keys",
        "_fold_unsafe",
        "_safe_keys",
    )

    def __init__(self, config: Config) -> None:
        self.header_names: frozenset[str] = frozenset(
            n.lower().replace("_", "-") for n in config.redact_headers
        )
        self.header_substrings: tuple[str, ...] = tuple(
            sorted(s.lower() for s in config.redact_header_substrings)
        )
        self.query_keys = frozenset(normalized(k) for k in config.redact_query)
        self.body_keys = frozenset(normalized(k) for k in config.redact_body_keys)
        #: A query or body key whose normalised name holds one of these is redacted too.
        self.key_substrings: tuple[str, ...] = tuple(
            sorted({normalized(s) for s in config.redact_key_substrings} - {""})
        )
        # What a form body must contain (lower-cased, '-' and '_' removed) to possibly hold a
        # redacted key: one of the keys whole, or one of the substrings inside a name.
        needles = _alternation(sorted({key.encode("utf-8") for key in self.body_keys if key}))
        inside = _alternation(sorted({part.encode("utf-8") for part in self.key_substrings}))
        branches = []
        if needles:
            branches.append(b"(?:^|&)" + needles + b"=")
        if inside:
            branches.append(b"(?:^|&)[^&=]*" + inside)
        self._form_keys = re.compile(b"|".join(branches)) if branches else None
        # Non-ASCII keys fold differently in bytes, and a key with punctuation could match
        # across JSON's structure: such a config always parses and walks bodies in full.
        self._fold_unsafe = not all(
            key.isascii() and key.isalnum()
            for key in (*self.body_keys, *self.key_substrings)
            if key
        )
        #: JSON keys seen that are not redacted (bodies repeat their keys; bounded).
        self._safe_keys: set[str] = set()

    # -- headers -------------------------------------------------------------------------------

    def _secret_name(self, name: str) -> tuple[str, bool]:
        """``name`` as names compare (``_`` as ``-``), and whether its value is redacted."""
        if "_" in name:  # uvicorn passes "X-Api_Key" on as sent: "_" matches as "-" does
            name = name.replace("_", "-")
        return name, name in self.header_names or any(s in name for s in self.header_substrings)

    def header(self, name: str, value: str) -> str:
        """The value to record for a header (``name`` lower-cased)."""
        name, secret = self._secret_name(name)
        if not secret:
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

    def header_kept(self, name: str) -> bool:
        """True when :meth:`header` returns any value of the header ``name`` unchanged."""
        name, secret = self._secret_name(name)
        return not secret and name not in _URL_HEADERS and name != "host"

    def url(self, value: str) -> str:
        """A URL-valued header (``Referer``, ``Location``...) with its secrets replaced.

        Userinfo (``user:password@``) always; query parameter values as ``redact_query``
        says, as in ``request.url``, and so in a fragment of ``name=value`` pairs (an OAuth
        implicit grant redirects to ``...#access_token=...``). The rest is kept as it was.
        A WSGI server folds a repeated header into one value joined by ``,``: each part is
        then redacted again as a URL of its own, so a second URL's userinfo and query cannot
        pass as text inside the first one's query.
        """
        redacted = self._url(value)
        if "," not in redacted:
            return redacted
        return ",".join(self._url(part) for part in redacted.split(","))

    def _url(self, value: str) -> str:
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
        return _key_in(name, self.query_keys, self.key_substrings)

    # -- bodies --------------------------------------------------------------------------------

    def may_hold_key(self, data: bytes) -> bool:
        """False when no redacted key can appear in the form body ``data`` (a cheap scan).

        Every key of a form is a run between ``&`` (or the start) and ``=``: once ASCII is
        folded the way keys are compared (lower case, ``-`` and ``_`` removed), one search
        over the folded bytes finds each key that could match, with no parse. Escapes (``%``
        and ``+``) could spell a key in disguise, a name may nest one in brackets
        (``user[password]``), and the Kelvin sign lower-cases to ``k``: then it is parsed. So
        are all bodies when a configured key holds anything but ASCII letters and digits.
        """
        if self._form_keys is None:
            return False
        if self._fold_unsafe or _KELVIN in data:
            return True
        if b"%" in data or b"+" in data or b"[" in data:
            return True
        return self._form_keys.search(_folded(data)) is not None

    def body(self, data: bytes, kind: BodyKind) -> bytes | None:
        """``data`` with redacted keys' values replaced, or None when it cannot be parsed.

        A JSON body is always parsed (a body labelled JSON that is not JSON is left out, since
        its secrets could be anywhere) and walked (cheaper than a scan of its bytes for keys,
        and blind to escapes); it is re-encoded only when a value was replaced.
        """
        if kind == "other":
            return data
        if kind == "form":
            return self._form(data) if self.may_hold_key(data) else data
        try:
            document = _loads(data)
        except (ValueError, RecursionError):
            return None
        if not self.body_keys or not self._scrub(document):
            return data
        try:
            return _dumps(document)
        except (ValueError, TypeError, RecursionError):
            return None

    def _scrub(self, document: Any) -> bool:
        """Replace redacted keys' values in place, at any depth; True if any was.

        Bodies are mostly lists of records that repeat their keys: a list whose items are all
        dicts with keys already seen and found safe is taken in one step (its keys checked,
        and its records' values searched for containers, by C-level iteration), and a node
        holding no container is not looked into further.
        """
        if type(document) is not dict and type(document) is not list:
            return False
        changed = False
        stack = [document]
        safe = self._safe_keys
        while stack:
            node = stack.pop()
            values: Iterable[Any]
            if type(node) is dict:
                if not safe.issuperset(node):
                    changed = self._scrub_keys(node) or changed
                values = node.values()
            elif _ONLY_DICTS == set(map(type, node)) and safe.issuperset(chain.from_iterable(node)):
                if _CONTAINERS.isdisjoint(map(type, chain.from_iterable(map(dict.values, node)))):
                    continue
                values = list(chain.from_iterable(map(dict.values, node)))
            else:
                values = node
            if not _CONTAINERS.isdisjoint(map(type, values)):
                stack.extend([v for v in values if type(v) is dict or type(v) is list])
        return changed

    def _scrub_keys(self, node: dict[str, Any]) -> bool:
        changed = False
        safe = self._safe_keys
        substrings = self.key_substrings
        for key in node:
            name = normalized(key)
            if name in self.body_keys:
                node[key] = REDACTED  # an existing key: the dict keeps its size
                changed = True
            elif substrings and any(part in name for part in substrings):
                # Never cached as safe: another record may give this key a string.
                if type(node[key]) not in _SCALARS:
                    node[key] = REDACTED  # a string, or an array or object of anything
                # Changed either way: a scalar kept is the last of the key's values, and the
                # raw bytes may hold an earlier one ({"x_token": "secret", "x_token": 1}) that
                # only re-encoding the parsed document leaves out.
                changed = True
            elif key == "input":
                # Never cached as safe: a validation error (pydantic's, FastAPI's 422)
                # repeats the rejected value under "input" and names its field in "loc".
                if self._echoes_secret(node):
                    node[key] = REDACTED
                    changed = True
            elif len(safe) < 4096:
                safe.add(key)
        return changed

    def _echoes_secret(self, node: dict[str, Any]) -> bool:
        """Whether ``node`` is a validation error whose ``input`` is the value of a field
        redacted by name (the last name in ``loc``), judged as that field's value would be."""
        loc = node.get("loc")
        if type(loc) is not list:
            return False
        field = next((part for part in reversed(loc) if type(part) is str), None)
        if field is None:
            return False
        name = normalized(field)
        if name in self.body_keys:
            return True
        return type(node["input"]) not in _SCALARS and any(
            part in name for part in self.key_substrings
        )

    def _form(self, data: bytes) -> bytes:
        parts = data.split(b"&")
        changed = False
        for index, part in enumerate(parts):
            name, equals, _ = part.partition(b"=")
            if not equals:
                continue
            decoded = unquote_plus(
                name.decode("utf-8", "replace"), encoding="utf-8", errors="replace"
            )
            if _key_in(decoded, self.body_keys, self.key_substrings):
                parts[index] = name + b"=" + _REDACTED_BYTES
                changed = True
        return b"&".join(parts) if changed else data


_BRACKETS = re.compile(r"[\[\]]+")


def _key_in(name: str, keys: frozenset[str], substrings: tuple[str, ...]) -> bool:
    """Whether a query or form name is one of ``keys`` or holds one of ``substrings``
    (normalised), or does so in brackets.

    PHP, Rails and jQuery's ``$.param`` write nested fields as ``user[password]`` and lists as
    ``token[]``: any bracketed part that matches redacts the value.
    """
    folded = normalized(name)
    if folded in keys or any(part in folded for part in substrings):
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

#: U+212A KELVIN SIGN in UTF-8: ``str.lower()`` makes it an ASCII ``k`` (the only character
#: besides ASCII whose lower case is ASCII, with U+0130 giving ``i`` and a combining dot).
_ONLY_DICTS = {dict}
#: JSON values a key matched by a substring keeps (``"max_tokens": 100``).
_SCALARS = frozenset({int, float, bool, type(None)})
_CONTAINERS = frozenset({dict, list})
_KELVIN = "\u212a".encode()


def _folded(data: bytes) -> bytes:
    """``data`` with ASCII lower-cased and ``-`` and ``_`` removed, as :func:`normalized`."""
    data = data.lower()
    if b"-" in data:
        data = data.replace(b"-", b"")
    if b"_" in data:
        data = data.replace(b"_", b"")
    return data


def _alternation(words: list[bytes]) -> bytes:
    """A regular expression matching exactly ``words``, factored by common prefixes.

    Python's engine tries the branches of ``a|b|c`` one by one at each place; a trie tries
    one branch per byte, which makes the scan of a body several times faster.
    """
    if not words:
        return b""
    branches: dict[int, list[bytes]] = {}
    ends = False
    for word in words:
        if word:
            branches.setdefault(word[0], []).append(word[1:])
        else:
            ends = True
    parts = [
        re.escape(bytes([first])) + _alternation(rest) for first, rest in sorted(branches.items())
    ]
    if not parts:
        return b""
    if len(parts) == 1 and not ends:
        return parts[0]
    return b"(?:" + b"|".join(parts) + b")" + (b"?" if ends else b"")


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
