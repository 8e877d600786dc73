"""URLs and IP addresses that always validate, whatever a request carried.

ALF 1.1.0 checks ``request.url`` with ``format: uri`` (RFC 3986) and the two addresses with
``format: ipv4``/``ipv6``. A collector that validates rejects a whole ALF object, every entry of
the batch with it, for one bad value; so every value built here is valid by construction, and a
value that cannot be written faithfully is replaced by a documented placeholder
(:data:`INVALID_HOST`). The raw value is never lost: the request's ``Host`` header, as sent,
stays in ``request.headers``.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from functools import lru_cache
from typing import Any
from urllib.parse import quote

#: The URL host written when the request's Host (or server name) is not a valid URI host:
#: empty, with userinfo, a bad IP literal, a port outside 1-65535, characters no host may
#: hold... ``.invalid`` names are reserved never to resolve (RFC 6761 section 6.4).
INVALID_HOST = "invalid"

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_DEFAULT_PORTS = {"http": 80, "https": 443}
# A DNS name (letters, digits, '-', '_' and dots), at most 253 characters (RFC 1035 2.3.4).
_REG_NAME = re.compile(r"[A-Za-z0-9_\-]+(?:\.[A-Za-z0-9_\-]+)*\.?")
_MAX_NAME = 253
# A path and a query as RFC 3986 allows them unescaped: pchar, '/', and '?' in the query.
_PATH_OK = re.compile(r"(?:[A-Za-z0-9\-._~!$&'()*+,;=:@/]|%[0-9A-Fa-f]{2})*")
_QUERY_OK = re.compile(r"(?:[A-Za-z0-9\-._~!$&'()*+,;=:@/?]|%[0-9A-Fa-f]{2})*")
_PATH_SAFE = "/:@!$&'()*+,;=-._~%"
_QUERY_SAFE = _PATH_SAFE + "?"
_LONE_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")
#: The ``scheme://authority`` in front of an absolute-form request target's path.
_ABSOLUTE_FORM = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://[^/?#]*")
_SURROGATES = re.compile("[\ud800-\udfff]")


def clean(value: str) -> str:
    """``value`` as text that encodes to UTF-8: each lone surrogate becomes U+FFFD."""
    if value.isascii():
        return value
    return _SURROGATES.sub("\ufffd", value)


def to_bytes(value: str) -> bytes:
    """The bytes a server's ``str`` stands for: Latin-1 (WSGI's rule), else UTF-8.

    Lone surrogates from ``surrogateescape`` decoding give back their original byte; any other
    surrogate is written as its UTF-8 form, so nothing is lost and nothing raises.
    """
    try:
        return value.encode("latin-1")
    except UnicodeEncodeError:
        pass
    try:
        return value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return value.encode("utf-8", "surrogatepass")


def escape(value: str, query: bool = False) -> str:
    """A path (or query) as RFC 3986 allows it: valid ``%XX`` kept, everything else escaped.

    A path in absolute form (``http://user:pass@host/p``: a request target a client may send,
    RFC 9112 3.2.2, which uvicorn's h11 protocol passes on as the path) is reduced to its
    path (``/p``), so userinfo in it never reaches an entry.
    """
    if not query and value[:1] != "/" and "://" in value:
        value = _ABSOLUTE_FORM.sub("", value, count=1)
    if (_QUERY_OK if query else _PATH_OK).fullmatch(value):
        return value
    escaped = quote(to_bytes(value), safe=_QUERY_SAFE if query else _PATH_SAFE)
    # quote() leaves '%' alone to keep valid escapes: a '%' not followed by two hex digits is
    # escaped itself.
    return _LONE_PERCENT.sub("%25", escaped)


@lru_cache(maxsize=1024)
def origin(scheme: str, host: str) -> str:
    """``scheme://host[:port]`` for a URL, from the Host header as the client sent it.

    Cached: a service sees few distinct hosts, and a client choosing new ones costs a bounded
    cache. The default port is left out; an IDN is written in its ASCII (punycode) form.
    """
    if scheme not in _DEFAULT_PORTS:
        scheme = "http"
    authority = _authority(host, _DEFAULT_PORTS[scheme])
    return f"{scheme}://{authority}"


def _authority(raw: str, default_port: int) -> str:
    value = raw.strip(" \t")
    if not value or "@" in value:
        return INVALID_HOST  # userinfo has no place in a Host header (RFC 9110 7.2)
    if value.startswith("["):
        literal, bracket, rest = value[1:].partition("]")
        if not bracket:
            return INVALID_HOST
        address = _ipv6(literal)
        if address is None:
            return INVALID_HOST
        name = f"[{address}]"
    elif value.count(":") > 1:
        # A bare IPv6 literal (a server name, or a client that forgot the brackets).
        address = _ipv6(value)
        return INVALID_HOST if address is None else f"[{address}]"
    else:
        name, colon, port = value.partition(":")
        rest = colon + port
        if not name.isascii():
            try:
                # Servers hand the header over as bytes read as Latin-1 (PEP 3333, and our
                # ASGI reader): recover the UTF-8 a client sent, as for every header value.
                name = name.encode("latin-1").decode("utf-8")
            except UnicodeError:
                pass  # not Latin-1 text, or a real Latin-1 name: taken as it is
            try:
                name = name.encode("idna").decode("ascii")
            except UnicodeError:
                return INVALID_HOST
        if len(name) > _MAX_NAME or not _REG_NAME.fullmatch(name):
            return INVALID_HOST
    if rest:
        port = rest[1:]
        if rest[0] != ":":
            return INVALID_HOST
        if port:  # "host:" names the default port (RFC 3986 6.2.3)
            if not (port.isascii() and port.isdigit()) or len(port) > 5:
                return INVALID_HOST
            number = int(port)
            if not 0 < number <= 65535:
                return INVALID_HOST
            if number != default_port:
                return f"{name}:{number}"
    return name


def _ipv6(literal: str) -> str | None:
    # A zone ("fe80::1%eth0") is a local interface detail: no URI validator accepts it.
    if "%" in literal:
        return None
    try:
        return str(ipaddress.IPv6Address(literal))
    except ValueError:
        return None


@lru_cache(maxsize=1024)
def ip_literal(candidate: str) -> str | None:
    """The normalised text of an IP literal, or None (cached: peers repeat, parsing raises).

    Accepts ``[v6]`` and ``[v6]:port`` and ``v4:port`` (as forwarding headers write them);
    drops an IPv6 zone (``fe80::1%lo``: local to this host, and the schema refuses it) and
    writes an IPv4-mapped IPv6 address (``::ffff:10.0.0.1``, from dual-stack sockets) as IPv4.
    """
    address = ip_address(candidate)
    return None if address is None else str(address)


def ip_address(candidate: str) -> IPAddress | None:
    """The address an IP literal names (see :func:`ip_literal`), or None."""
    value = candidate.strip(' \t"')
    if value.startswith("["):
        value = value[1:].partition("]")[0]
    elif value.count(":") == 1:
        value = value.partition(":")[0]
    value = value.partition("%")[0]
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


@lru_cache(maxsize=1024)
def anonymized(literal: str) -> str:
    """An address (normalised text) with its host part zeroed: IPv4 to /24, IPv6 to /48."""
    address = ipaddress.ip_address(literal)
    prefix = 24 if address.version == 4 else 48
    return str(ipaddress.ip_network(f"{address}/{prefix}", strict=False).network_address)


def _text(value: Any) -> str:
    return value.decode("latin-1") if isinstance(value, bytes) else str(value)


def forwarded_hops(headers: Sequence[Any], header: str) -> list[str]:
    """The addresses one forwarding header lists, left to right (repeated headers joined).

    ``header`` is ``"x-forwarded-for"`` or ``"forwarded"`` (RFC 7239 ``for=`` parameters);
    the other one is never read, so a client cannot slip its own past a proxy that only
    appends the configured one.
    """
    hops: list[str] = []
    wanted = header.encode("ascii")
    for raw_name, raw_value in headers:
        name = raw_name.lower()
        if name != header and name != wanted:
            continue
        value = _text(raw_value)
        if header == "x-forwarded-for":
            hops.extend(part.strip() for part in value.split(","))
            continue
        for element in value.split(","):
            found = ""
            for param in element.split(";"):
                key, _, val = param.strip().partition("=")
                if key.strip().lower() == "for":
                    found = val.strip()
            # An element without for= is a hop we cannot name: it stops the walk.
            hops.append(found)
    return hops


def client_address(
    peer: str, headers: Sequence[Any], trusted: tuple[IPNetwork, ...], header: str
) -> str:
    """The socket peer, or, behind trusted proxies, the first untrusted hop from the right.

    ``peer`` is a normalised IP literal. The forwarding header is read only when the peer is
    a trusted proxy, and then walked hop by hop from the right through trusted addresses only:
    a client cannot forge its address. A hop that is not an IP literal (``unknown``, an
    obfuscated name) ends the walk at the last trusted proxy.
    """
    if not trusted or not _trusted(peer, trusted):
        return peer
    client = peer
    for hop in reversed(forwarded_hops(headers, header)):
        address = ip_literal(hop) if hop else None
        if address is None:
            break
        client = address
        if not _trusted(address, trusted):
            break
    return client


@lru_cache(maxsize=1024)
def _trusted(literal: str, trusted: tuple[IPNetwork, ...]) -> bool:
    address = ip_address(literal)
    if address is None:
        return False
    return any(address.version == network.version and address in network for network in trusted)
