"""What a collector is configured with: accepted service tokens, the read key, and its limits.

Every secret is shown masked (or by the name given to it) wherever the collector prints,
logs or answers it: :func:`mask` is the one place that decides how.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Final
from urllib.parse import unquote_plus

__all__ = [
    "AccessLogMask",
    "CollectorError",
    "Limits",
    "ServiceToken",
    "SettingsError",
    "TokenSet",
    "check_read_key",
    "is_loopback",
    "mask",
    "parse_duration",
    "token_id",
]

SUPPORTED_VERSIONS: Final = ("1.0.0", "1.1.0")
"""ALF versions the collector accepts, each at ``/<version>/single`` and ``/<version>/batch``."""


class CollectorError(Exception):
    """The collector cannot do what was asked (bad settings, or a database it cannot use)."""


class SettingsError(CollectorError, ValueError):
    """Settings that are each valid but unsafe together (a read key that is a service token).

    A :class:`CollectorError` (the CLI answers it with exit code 2, as other bad settings)
    and a :class:`ValueError` (a bad value given to :func:`~.app.create_app`)."""


def mask(secret: str) -> str:
    """A token or key as it may be shown: its last four characters at most."""
    return f"...{secret[-4:]}" if len(secret) >= 12 else "***"


def token_id(token: str) -> str:
    """A stable, non-reversible id for a service token (``svc_`` + 12 hex digits)."""
    return "svc_" + hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()[:12]


@dataclass(frozen=True)
class ServiceToken:
    """One accepted service token, optionally named (``--token billing=TOKEN``)."""

    token: str
    name: str | None = None

    @property
    def id(self) -> str:
        """What answers and filters use for this token: its name, else :func:`token_id`."""
        return self.name or token_id(self.token)

    @property
    def shown(self) -> str:
        return self.name or mask(self.token)


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class TokenSet:
    """The service tokens a collector accepts; empty means any token (loopback only)."""

    def __init__(self, tokens: Iterable[ServiceToken] = ()) -> None:
        self._by_token: dict[str, ServiceToken] = {}
        names: set[str] = set()
        for token in tokens:
            if token.name is not None:
                if token.name in names:
                    raise CollectorError(f"service token name {token.name!r} is given twice")
                names.add(token.name)
            self._by_token[token.token] = token

    @classmethod
    def parse(cls, specs: Iterable[str]) -> TokenSet:
        """Tokens from ``TOKEN`` or ``NAME=TOKEN`` strings (``--token``, files, environment).

        Each string is taken literally (a leading ``#`` is part of the token: comments are
        for :meth:`from_sources`' tokens file); an empty one, or ``NAME=`` with nothing
        after it, is a :class:`CollectorError`, never a silently open collector.
        """
        tokens = []
        for raw in specs:
            spec = raw.strip()
            if not spec:
                raise CollectorError("a service token is empty: give each one as [NAME=]TOKEN")
            name: str | None = None
            if "=" in spec:
                candidate, _, rest = spec.partition("=")
                if _NAME.fullmatch(candidate):
                    if not rest:
                        raise CollectorError(
                            f"service token {candidate!r} is empty: give it as {candidate}=TOKEN "
                            f"(a token that itself ends in '=' as NAME={candidate}=)"
                        )
                    name, spec = candidate, rest
            if any(ch.isspace() for ch in spec) or not spec.isprintable():
                raise CollectorError(
                    f"service token {mask(spec)} holds whitespace or control characters"
                )
            tokens.append(ServiceToken(spec, name))
        return cls(tokens)

    @classmethod
    def from_sources(
        cls,
        tokens: Iterable[str] = (),
        tokens_file: str | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> TokenSet:
        """Tokens from ``--token`` values, a ``--tokens-file`` and ``ALF_COLLECTOR_TOKENS``.

        ``--token`` values are literal (see :meth:`parse`); in the file, blank lines and
        lines starting with ``#`` are skipped; in the variable (comma-separated) empty items
        are skipped.
        """
        specs = list(tokens)
        if tokens_file is not None:
            try:
                # utf-8-sig: a file saved with a byte order mark (Notepad's UTF-8) reads as
                # its editor shows it, not with U+FEFF glued to the first token.
                with open(tokens_file, encoding="utf-8-sig") as file:
                    lines = file.read().splitlines()
            except (OSError, UnicodeDecodeError) as exc:
                raise CollectorError(f"cannot read tokens file {tokens_file}: {exc}") from exc
            specs.extend(
                line for line in lines if line.strip() and not line.lstrip().startswith("#")
            )
        env = os.environ if environ is None else environ
        specs.extend(
            item for item in env.get("ALF_COLLECTOR_TOKENS", "").split(",") if item.strip()
        )
        return cls.parse(specs)

    def specs(self) -> list[list[str | None]]:
        """The tokens as ``[token, name]`` pairs (JSON for ``--workers``: no lossy joining)."""
        return [[token.token, token.name] for token in self]

    @classmethod
    def from_specs(cls, pairs: Iterable[Iterable[str | None]]) -> TokenSet:
        """The inverse of :meth:`specs`."""
        tokens = []
        for pair in pairs:
            token, name = pair
            if not isinstance(token, str) or not (name is None or isinstance(name, str)):
                raise CollectorError("service tokens must be [token, name] pairs of strings")
            tokens.append(ServiceToken(token, name))
        return cls(tokens)

    def __bool__(self) -> bool:
        return bool(self._by_token)

    def __len__(self) -> int:
        return len(self._by_token)

    def __iter__(self) -> Iterator[ServiceToken]:
        return iter(self._by_token.values())

    def accepts(self, token: str) -> bool:
        """Whether an ALF with this ``serviceToken`` may be stored."""
        return not self._by_token or token in self._by_token

    def lookup(self, token: str) -> ServiceToken:
        """The configured token (with its name), or an unnamed one when any token is open."""
        return self._by_token.get(token) or ServiceToken(token)

    def is_service_token(self, value: str) -> bool:
        return value in self._by_token


def check_read_key(read_key: str | None, tokens: TokenSet) -> None:
    """Refuse a read key that is also an accepted service token (:class:`SettingsError`).

    Service tokens are embedded in every agent's configuration (often less guarded than the
    collector): one that is the read key too would let each of them read all stored data.
    The message names the token by its name when it has one, never by any part of its value.
    """
    if not read_key or not tokens.is_service_token(read_key):
        return
    name = tokens.lookup(read_key).name
    which = f"the service token {name!r}" if name else "an accepted service token"
    raise SettingsError(
        f"the read key is also {which}: every agent holding that token could read all stored "
        "data. Use a read key (--read-key, ALF_COLLECTOR_READ_KEY) no service token equals."
    )


def _spelled_in_a_url(secret: str) -> str:
    """A pattern of ``secret`` as a request target may spell it: each character as itself
    or percent-encoded (its UTF-8 bytes, hex digits in either case), a space also as ``+``."""
    parts = []
    for char in secret:
        encoded = "".join(
            "%" + "".join(f"[{d}{d.lower()}]" if d.isalpha() else d for d in f"{byte:02X}")
            for byte in char.encode("utf-8", "surrogatepass")
        )
        spellings = [re.escape(char), encoded, *([r"\+"] if char == " " else [])]
        parts.append(f"(?:{'|'.join(spellings)})")
    return "".join(parts)


_SERVICE_PARAMETER: Final = re.compile(r"([?&](?:service|service_token)=)([^&#\s]*)")
_TOKEN_ID: Final = re.compile(r"svc_[0-9a-f]{12}")


class AccessLogMask(logging.Filter):
    """Masks secrets in the lines of uvicorn's access log (``--verbose``), whose request
    targets are logged as sent: ``/api/entries?service=TOKEN`` filters by a token itself.

    Each accepted service token becomes its name (or :func:`mask`), the read key its mask,
    however the URL spelled them; and, since an open collector (no tokens listed) knows no
    token to look for, the value of a ``service`` parameter that is neither a token's name
    nor a :func:`token_id` is masked too.
    """

    def __init__(self, tokens: TokenSet, read_key: str | None) -> None:
        super().__init__()
        shown = {token.token: token.shown for token in tokens}
        if read_key:
            shown[read_key] = mask(read_key)
        self._names = {token.name for token in tokens if token.name}
        secrets = sorted(shown, key=len, reverse=True)  # the longest first: one may hold another
        self._shown = [shown[secret] for secret in secrets]
        self._pattern = (
            re.compile("|".join(f"(?P<s{i}>{_spelled_in_a_url(s)})" for i, s in enumerate(secrets)))
            if secrets
            else None
        )

    def _masked(self, text: str) -> str:
        if self._pattern is not None:
            text = self._pattern.sub(lambda m: self._shown[int(str(m.lastgroup)[1:])], text)
        return _SERVICE_PARAMETER.sub(self._service, text)

    def _service(self, match: re.Match[str]) -> str:
        value = unquote_plus(match.group(2))
        if not value or value in self._names or _TOKEN_ID.fullmatch(value) or value in self._shown:
            return match.group(0)
        return match.group(1) + mask(value)

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(
                self._masked(arg) if isinstance(arg, str) else arg for arg in record.args
            )
        elif isinstance(record.msg, str) and not record.args:
            record.msg = self._masked(record.msg)
        return True


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) only listens on this machine."""
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


_DURATION = re.compile(r"(\d+)\s*([smhdw]?)")
_UNITS: Final = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}


def parse_duration(text: str) -> float:
    """Seconds from ``30d``, ``12h``, ``90m``, ``45s``, ``2w`` or plain seconds."""
    match = _DURATION.fullmatch(text.strip().lower())
    if match is None or int(match.group(1)) <= 0:
        raise ValueError(f"invalid duration {text!r} (use e.g. 30d, 12h, 90m)")
    return float(int(match.group(1)) * _UNITS[match.group(2)])


_JSON_VALUES_PER_ENTRY: Final = 100
"""The separators (``,`` and ``:``) a body may hold per entry allowed (``max_entries``): a
realistic entry with a dozen headers has about 60; never fewer than ``_MIN_JSON_VALUES``."""
_MIN_JSON_VALUES: Final = 500_000


@dataclass(frozen=True)
class Limits:
    """What one request may cost; over a limit the request is answered 413 (or 408).

    ``max_body_bytes`` bounds the body as sent (compressed), ``max_decompressed_bytes`` what
    it inflates to (decompression stops there), ``max_entries`` the entries per request,
    ``max_errors`` the error strings in an answer, ``body_timeout`` the seconds a client has
    to send its whole body. Two bounds follow ``max_entries``, so that a request of
    ``max_entries`` entries is never refused by them: :attr:`max_alfs` (the ALF objects per
    request) and :attr:`max_json_values` (the JSON values it may hold, counted cheaply before
    parsing, so that parsing memory stays a small multiple of the body).
    """

    max_body_bytes: int = 1_048_576
    max_decompressed_bytes: int = 8 * 1_048_576
    max_entries: int = 10_000
    max_errors: int = 50
    body_timeout: float = 30.0

    def __post_init__(self) -> None:
        for name in (
            "max_body_bytes",
            "max_decompressed_bytes",
            "max_entries",
            "max_errors",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise CollectorError(f"{name} must be a positive integer, got {value!r}")
        if not self.body_timeout > 0:
            raise CollectorError(f"body_timeout must be > 0, got {self.body_timeout!r}")

    @property
    def max_alfs(self) -> int:
        """ALF objects per request: ``max_entries`` (the Java agent sends one entry each; an
        ALF with no entry still counts, so objects stay bounded however few entries)."""
        return self.max_entries

    @property
    def max_json_values(self) -> int:
        """Separators (``,`` and ``:``, inside strings too) a body may hold before it is
        parsed: 100 per allowed entry, at least 500,000."""
        return max(_MIN_JSON_VALUES, _JSON_VALUES_PER_ENTRY * self.max_entries)
