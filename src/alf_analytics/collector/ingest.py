"""From request body to rows: decompress with a cap, parse, validate each entry, index it.

Everything here is synchronous and pure (no I/O): :func:`prepare` turns the bytes of one
``POST /<version>/<kind>`` into a :class:`Prepared` holding the rows to store and the
answer's errors. Its cost is bounded by the :class:`~.settings.Limits`: decompression stops
at ``max_decompressed_bytes``, the JSON values are counted before parsing, and the ALF
objects, entries and error strings are capped.

Validation uses the bundled official ALF schemas compiled by ``jsonschema-rs`` (native code)
with its format checks on (``uri``, ``date-time``, ``ipv4``, ``ipv6``: the test suite checks
that they refuse what ``jsonschema``'s ``FormatChecker`` refuses), plus range checks on the
indexed numbers. The ALF envelope
and each entry are validated apart, so one bad entry costs only itself.
"""

from __future__ import annotations

import calendar
import copy
import json
import math
import re
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache, lru_cache
from importlib import resources
from typing import Any, Final, cast

import jsonschema_rs
import orjson

from .folding import fold_route
from .settings import SUPPORTED_VERSIONS, Limits, TokenSet, mask

__all__ = [
    "CONSUMER_HEADER",
    "MAX_NESTING",
    "MAX_STARTED",
    "MIN_STARTED",
    "AlfGroup",
    "EntryRow",
    "IngestError",
    "Prepared",
    "bucket_of",
    "bucket_value",
    "decode_body",
    "prepare",
]

CONSUMER_HEADER: Final = "x-alf-consumer"
"""The synthetic request header the agent adds for the consumer id (stored in a column)."""
_CONSUMER_LENGTH: Final = len(CONSUMER_HEADER)

_MAX_MESSAGE: Final = 300
_MAX_INT: Final = 2**53  # the largest size accepted (inclusive): README "-1 to 2^53"
_MAX_STATUS: Final = 999
# Column caps: the entry itself keeps the full values.
_MAX_METHOD: Final = 64
_MAX_HOST: Final = 255
_MAX_PATH: Final = 2048
_MAX_CONSUMER: Final = 256
_MAX_IP: Final = 64
# har.log.creator is stored once per distinct value under a UNIQUE index, and PostgreSQL's
# index entries hold at most 2,704 bytes: a longer creator keeps its name and version, each
# cut to this many characters (at most 6 bytes each in JSON). The entries are unchanged.
_MAX_CREATOR_BYTES: Final = 1024
_MAX_CREATOR_FIELD: Final = 128

MIN_STARTED: Final = -62_135_596_800_000_000
"""0001-01-01T00:00:00Z in microseconds since the epoch: the earliest time stored or queried."""
MAX_STARTED: Final = 253_402_300_799_999_999
"""9999-12-31T23:59:59.999999Z: the latest (Python's datetime, and ISO 8601 without an
expanded year, end there; ``9999-12-31T23:59:59-14:00`` is already the year 10000 in UTC)."""

# orjson writes at most 254 levels of arrays and objects. An entry is stored as the JSON
# orjson writes for it nested in this many arrays, so that what the read side wraps it in
# (an API answer, a HAR document) can never go over orjson's limit.
_NESTING_MARGIN: Final = 16
MAX_NESTING: Final = 254 - _NESTING_MARGIN
"""The deepest nesting of arrays and objects an entry (and ``har.log.creator``) may have."""
_NESTED_TOO_DEEPLY: Final = f"is nested more than {MAX_NESTING} levels deep"


def text_column(value: str) -> str:
    """``value`` as an indexed text column holds it: NUL (which PostgreSQL's text cannot hold)
    replaced by U+FFFD, on both backends, so that filters match alike (the entry keeps it)."""
    return value.replace("\x00", "\ufffd") if "\x00" in value else value


class IngestError(Exception):
    """Ends a request with ``status`` and one error string (no entry stored)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = _bounded(message)


def _bounded(message: str) -> str:
    message = message.encode("utf-8", "replace").decode("utf-8")
    return message if len(message) <= _MAX_MESSAGE else message[: _MAX_MESSAGE - 3] + "..."


# -- latency buckets ------------------------------------------------------------------------

BUCKET_BASE_MS: Final = 0.01
BUCKETS_PER_DOUBLING: Final = 8
MAX_BUCKET: Final = 255


def bucket_of(time_ms: float) -> int:
    """The latency bucket of a duration: 8 per doubling from 0.01 ms (about 9% wide)."""
    if not time_ms > BUCKET_BASE_MS:
        return 0
    index = math.ceil(BUCKETS_PER_DOUBLING * math.log2(time_ms / BUCKET_BASE_MS))
    return min(index, MAX_BUCKET)


def bucket_value(bucket: int) -> float:
    """What a bucket reports: the geometric middle of its bounds, in ms."""
    if bucket <= 0:
        return BUCKET_BASE_MS
    return float(BUCKET_BASE_MS * 2 ** ((bucket - 0.5) / BUCKETS_PER_DOUBLING))


# -- decoding -------------------------------------------------------------------------------


def _looks_compressed(body: bytes) -> bool:
    if body[:2] == b"\x1f\x8b":
        return True
    return len(body) >= 2 and body[0] & 0x0F == 8 and (body[0] << 8 | body[1]) % 31 == 0


def _inflate(data: bytes, wbits: int, cap: int, name: str, *, multi_member: bool) -> bytes:
    out: list[bytes] = []
    size = 0
    while True:
        decompressor = zlib.decompressobj(wbits)
        try:
            # Asking for cap + 1 bytes either reaches the cap (refused) or leaves nothing
            # pending: decompression never holds more than the cap.
            chunk = decompressor.decompress(data, cap + 1 - size)
        except zlib.error as exc:
            raise IngestError(400, f"invalid {name} body: {exc}") from exc
        size += len(chunk)
        if size > cap:
            raise IngestError(413, f"decompressed body exceeds the limit of {cap} bytes")
        out.append(chunk)
        if not decompressor.eof:
            raise IngestError(400, f"invalid {name} body: compressed data is truncated")
        data = decompressor.unused_data
        if not data:
            return b"".join(out)
        if not multi_member:
            raise IngestError(400, f"invalid {name} body: trailing data after the stream")


def decode_body(body: bytes, content_encoding: str | None, cap: int) -> bytes:
    """Undo ``Content-Encoding`` (gzip, deflate zlib-wrapped or raw, identity) with a cap."""
    codings = [c.strip().lower() for c in (content_encoding or "").split(",") if c.strip()]
    if len(codings) > 2:
        raise IngestError(400, "too many content codings")
    applied = False
    for coding in reversed(codings):
        if coding == "identity":
            continue
        if coding in ("gzip", "x-gzip"):
            body = _inflate(body, 16 + zlib.MAX_WBITS, cap, "gzip", multi_member=True)
        elif coding == "deflate":
            # RFC 9110 deflate is zlib-wrapped; many clients send raw deflate: accept both.
            if len(body) >= 2 and body[0] & 0x0F == 8 and (body[0] << 8 | body[1]) % 31 == 0:
                try:
                    body = _inflate(body, zlib.MAX_WBITS, cap, "deflate", multi_member=False)
                except IngestError as exc:
                    if exc.status == 413:
                        raise
                    body = _inflate(body, -zlib.MAX_WBITS, cap, "deflate", multi_member=False)
            else:
                body = _inflate(body, -zlib.MAX_WBITS, cap, "deflate", multi_member=False)
        else:
            raise IngestError(
                415, f"unsupported Content-Encoding {coding[:40]!r} (use gzip or deflate)"
            )
        applied = True
    if not applied and _looks_compressed(body):
        raise IngestError(400, "the body is compressed but no Content-Encoding says so")
    if len(body) > cap:
        raise IngestError(413, f"body exceeds the limit of {cap} bytes")
    return body


def _parse(body: bytes, limits: Limits) -> Any:
    if not body.strip():
        raise IngestError(400, "body is empty")
    # Commas and colons bound the number of JSON values (strings count themselves): a cheap
    # upper bound, so that parsing cannot build far more objects than the limit allows.
    values = body.count(b",") + body.count(b":")
    if values > limits.max_json_values:
        raise IngestError(
            413,
            f"body holds more than {limits.max_json_values} JSON values (commas and colons, "
            f"100 per entry allowed by --max-entries {limits.max_entries}): send fewer "
            "entries per request, or raise --max-entries",
        )
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        # orjson refuses NaN/Infinity, lone surrogates, invalid UTF-8 and nesting over 1024.
        raise IngestError(400, f"body is not valid JSON: {exc}") from exc


# -- validation -----------------------------------------------------------------------------


def _load_schema(version: str) -> dict[str, Any]:
    text = (resources.files("alf_analytics") / "schemas" / f"{version}.json").read_text("utf-8")
    return cast("dict[str, Any]", json.loads(text))


@dataclass(frozen=True)
class _Validators:
    alf: jsonschema_rs.Validator
    entry: jsonschema_rs.Validator
    full: jsonschema_rs.Validator


@cache
def _validators(version: str) -> _Validators:
    """The envelope (entries not looked into), entry and whole-ALF validators of a version."""
    schema = _load_schema(version)
    envelope = copy.deepcopy(schema)
    entries = envelope["properties"]["har"]["properties"]["log"]["properties"]["entries"]
    item = {"$schema": schema.get("$schema"), **entries.pop("items")}
    return _Validators(
        alf=jsonschema_rs.Draft4Validator(envelope, validate_formats=True),
        entry=jsonschema_rs.Draft4Validator(item, validate_formats=True),
        full=jsonschema_rs.Draft4Validator(schema, validate_formats=True),
    )


def _first_error(validator: jsonschema_rs.Validator, instance: object) -> str | None:
    try:
        if validator.is_valid(instance):
            return None
        for error in validator.iter_errors(instance):
            path = "$" + "".join(
                f"[{part}]" if isinstance(part, int) else f".{part}" for part in error.instance_path
            )
            return f"{path}: {_without_instance(error.message, error.instance, path)}"
    except ValueError:  # jsonschema-rs: "Recursion limit reached" (about 255 levels deep)
        return f"$ {_NESTED_TOO_DEEPLY}"
    return "$: invalid"  # pragma: no cover - is_valid and iter_errors disagree


def _bounded_json(value: object, **options: Any) -> bytes | None:
    """The JSON of ``value``, or ``None`` when it is nested more than ``MAX_NESTING`` deep."""
    wrapped = value
    for _ in range(_NESTING_MARGIN):
        wrapped = [wrapped]
    try:
        data = orjson.dumps(wrapped, **options)
    except orjson.JSONEncodeError:
        return None
    return data[_NESTING_MARGIN:-_NESTING_MARGIN]


_MAX_QUOTED: Final = 32


def _without_instance(message: str, instance: object, path: str) -> str:
    """``message`` with the offending value left out when it may be large or secret.

    The validator starts its messages with the value as JSON: an object, an array, a long
    string or a service token would repeat (part of) the document in the answer.
    """
    if isinstance(instance, float) and abs(instance) >= 2**63 and '"integer"' in message:
        # An integer beyond 64 bits, which the JSON parser read as a float: it is an integer.
        return "the integer is out of range"
    secret = path.endswith(".serviceToken")
    if isinstance(instance, (dict, list)) or (
        isinstance(instance, str) and (secret or len(instance) > _MAX_QUOTED)
    ):
        rendered = json.dumps(instance, ensure_ascii=False, separators=(",", ":"))
        if message.startswith(rendered):
            return f"the {_json_type(instance)}{message[len(rendered) :]}"
        if secret or len(message) > _MAX_MESSAGE // 2:
            return f"the {_json_type(instance)} is invalid"
    return message


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


# -- rows -----------------------------------------------------------------------------------

_DATETIME: Final = re.compile(
    r"(\d{4})-(\d\d)-(\d\d)[Tt](\d\d):(\d\d):(\d\d)(?:\.(\d+))?(?:[Zz]|([+-])(\d\d):(\d\d))"
)


@lru_cache(maxsize=4096)
def _epoch_seconds(value: str) -> int | None:
    """Seconds since the epoch of ``YYYY-MM-DDTHH:MM:SS`` plus an offset (cached)."""
    match = _DATETIME.fullmatch(value)
    if match is None:
        return None
    year, month, day, hour, minute, second = (int(g) for g in match.groups()[:6])
    seconds = calendar.timegm((year, month, day, hour, minute, second, 0, 0, 0))
    if match.group(8):
        offset = int(match.group(9)) * 3600 + int(match.group(10)) * 60
        seconds -= offset if match.group(8) == "+" else -offset
    return seconds


def _epoch_us(value: str) -> int:
    """Microseconds since the epoch of an RFC 3339 date-time (already validated)."""
    head, dot, rest = value.partition(".")
    if dot:
        digits = len(rest) - len(rest.lstrip("0123456789"))
        fraction, zone = rest[:digits], rest[digits:]
    else:
        fraction, zone = "", value[19:]
        head = value[:19]
    seconds = _epoch_seconds(head + zone)
    if seconds is None:
        raise ValueError(value)
    return seconds * 1_000_000 + int((fraction + "000000")[:6])


def _split_url(url: str) -> tuple[str, str]:
    """(host[:port], path) of an absolute URI (already validated), without userinfo."""
    scheme_end = url.find("://")
    if scheme_end < 0:  # such as urn:... or mailto:...: no authority
        return "", "/"
    rest = url[scheme_end + 3 :]
    end = len(rest)
    for mark in "/?#":
        found = rest.find(mark)
        if 0 <= found < end:
            end = found
    host = rest[:end].rpartition("@")[2]
    path = rest[end:]
    for mark in "?#":
        found = path.find(mark)
        if found >= 0:
            path = path[:found]
    return host, path or "/"


@dataclass(slots=True)
class EntryRow:
    """One valid entry with its indexed columns and its compressed JSON."""

    started: int  # microseconds since the epoch
    method: str
    host: str
    path: str
    route: str
    status: int
    time_ms: float
    bucket: int
    request_bytes: int
    response_bytes: int
    client_ip: str | None
    consumer: str | None
    entry: bytes  # the JSON of the entry as received (the store compresses it)


@dataclass
class AlfGroup:
    """The valid entries of one ALF object, with its envelope."""

    index: int
    version: str
    token: str
    environment: str | None
    creator: bytes | None  # canonical JSON of har.log.creator
    rows: list[EntryRow] = field(default_factory=list)


@dataclass
class Prepared:
    """What one request asks to store, and what its answer says so far."""

    sent: int
    groups: list[AlfGroup]
    errors: list[str]
    error_count: int
    refused_alfs: int  # ALF objects none of whose entries is stored
    refused_entries: int
    unauthorized: int  # ALF objects refused for their service token

    @property
    def entry_count(self) -> int:
        return sum(len(group.rows) for group in self.groups)

    @property
    def saved(self) -> int:
        return sum(1 for group in self.groups if group.rows)


class _Errors:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.items: list[str] = []
        self.count = 0

    def add(self, message: str) -> None:
        self.count += 1
        if len(self.items) < self.limit:
            self.items.append(_bounded(message))

    def finish(self) -> list[str]:
        if self.count > len(self.items):
            return [*self.items, f"... and {self.count - len(self.items)} more errors"]
        return self.items


def _entry_row(entry: Mapping[str, Any], alf_client_ip: str | None) -> EntryRow | str:
    """The row of a schema-valid entry, or why its values are out of range."""
    request = entry["request"]
    response = entry["response"]
    status = response["status"]
    if status > _MAX_STATUS:
        return f"$.response.status {status} is out of range (0..{_MAX_STATUS})"
    request_bytes = request["bodySize"]
    response_bytes = response["bodySize"]
    if not (
        -1 <= request_bytes <= _MAX_INT
        and -1 <= response_bytes <= _MAX_INT
        and -1 <= request.get("headersSize", 0) <= _MAX_INT
        and -1 <= response.get("headersSize", 0) <= _MAX_INT
    ):  # the slow path names the value
        for where, part in (("request", request), ("response", response)):
            for key in ("bodySize", "headersSize"):
                value = part.get(key)
                if isinstance(value, int) and not -1 <= value <= _MAX_INT:
                    return f"$.{where}.{key} is out of range (-1..2^53)"
    time_ms = float(entry["time"])
    if not -1.0 <= time_ms < 1e12:
        return "$.time is out of range"
    try:
        started = _epoch_us(entry["startedDateTime"])
    except (ValueError, OverflowError):
        return "$.startedDateTime is not a date-time this collector can store"
    if not MIN_STARTED <= started <= MAX_STARTED:
        return (
            f"$.startedDateTime {entry['startedDateTime'][:40]!r} is outside the years 0001 to "
            "9999 once in UTC"
        )
    data = _bounded_json(entry)
    if data is None:
        return f"$ {_NESTED_TOO_DEEPLY}"
    host, path = _split_url(request["url"])
    path = text_column(path[:_MAX_PATH])
    consumer = None
    for header in request["headers"]:
        name = header["name"]
        if len(name) == _CONSUMER_LENGTH and name.lower() == CONSUMER_HEADER:
            consumer = text_column(header["value"][:_MAX_CONSUMER]) or None
    client_ip = entry.get("clientIPAddress") or alf_client_ip
    return EntryRow(
        started,
        text_column(request["method"][:_MAX_METHOD]),
        text_column(host[:_MAX_HOST]),
        path,
        fold_route(path)[:_MAX_PATH],  # folding can lengthen it ("/1" -> "/{id}")
        status,
        time_ms,
        bucket_of(time_ms),
        request_bytes if request_bytes > 0 else 0,
        response_bytes if response_bytes > 0 else 0,
        text_column(client_ip[:_MAX_IP]) if isinstance(client_ip, str) else None,
        consumer,
        data,
    )


def _creator_json(creator: object) -> bytes | None:
    """The canonical JSON of ``har.log.creator``, bounded (see ``_MAX_CREATOR_BYTES``)."""
    if not isinstance(creator, dict):
        return None
    data = _bounded_json(creator, option=orjson.OPT_SORT_KEYS)
    if data is not None and len(data) <= _MAX_CREATOR_BYTES:
        return data
    bounded = {
        key: str(creator[key])[:_MAX_CREATOR_FIELD] for key in ("name", "version") if key in creator
    }
    return orjson.dumps(bounded, option=orjson.OPT_SORT_KEYS)


def prepare(body: bytes, *, version: str, kind: str, tokens: TokenSet, limits: Limits) -> Prepared:
    """Parse and validate a decoded request body into groups of rows to store."""
    if version not in SUPPORTED_VERSIONS:
        raise IngestError(404, f"unsupported ALF version {version[:20]!r}")
    payload = _parse(body, limits)
    if kind == "batch":
        if not isinstance(payload, list):
            raise IngestError(
                400, f"expected a JSON array of ALF objects, got {_json_type(payload)}"
            )
        alfs: list[Any] = payload
    elif isinstance(payload, dict):
        alfs = [payload]
    else:
        raise IngestError(400, f"expected an ALF object, got a JSON {_json_type(payload)}")
    if not alfs:
        raise IngestError(400, "the batch holds no ALF object")
    if len(alfs) > limits.max_alfs:
        raise IngestError(
            413,
            f"more than {limits.max_alfs} ALF objects in one request (as many as "
            "--max-entries allows entries): split the batch",
        )
    total_entries = sum(_count_entries(alf) for alf in alfs)
    if total_entries > limits.max_entries:
        raise IngestError(413, f"more than {limits.max_entries} entries in one request")

    validators = _validators(version)
    errors = _Errors(limits.max_errors)
    groups: list[AlfGroup] = []
    refused_alfs = refused_entries = unauthorized = 0
    for index, alf in enumerate(alfs):
        prefix = f"ALF[{index}]"
        count = _count_entries(alf)
        if not isinstance(alf, dict):
            errors.add(f"{prefix} expected an ALF object, got a JSON {_json_type(alf)} (at $)")
            refused_alfs += 1
            continue
        sent_version = alf.get("version")
        if isinstance(sent_version, str) and sent_version != version:
            errors.add(
                f"{prefix} $.version {sent_version[:20]!r} does not match the endpoint "
                f"version {version!r}"
            )
            refused_alfs += 1
            refused_entries += count
            continue
        # One call for the whole object, entries included; only when it fails are the
        # envelope and each entry validated apart (to store the good ones, name the bad).
        all_valid = validators.full.is_valid(alf)
        problem = None if all_valid else _first_error(validators.alf, alf)
        if problem is not None:
            token = alf.get("serviceToken")
            if isinstance(token, str) and len(token) >= 4:
                problem = problem.replace(token, mask(token))
            errors.add(f"{prefix} {problem}")
            refused_alfs += 1
            refused_entries += count
            continue
        token = alf["serviceToken"]
        if not tokens.accepts(token):
            errors.add(f"{prefix} service token {mask(token)} is not accepted by this collector")
            refused_alfs += 1
            refused_entries += count
            unauthorized += 1
            continue
        log = alf["har"]["log"]
        creator = log.get("creator")
        environment = alf.get("environment")
        group = AlfGroup(
            index=index,
            version=version,
            token=text_column(token),
            environment=text_column(environment) if isinstance(environment, str) else None,
            creator=_creator_json(creator),
        )
        alf_ip = alf.get("clientIPAddress")
        for position, entry in enumerate(log["entries"]):
            problem = None if all_valid else _first_error(validators.entry, entry)
            if problem is not None:
                errors.add(f"{prefix} entry[{position}] {problem}")
                refused_entries += 1
                continue
            row = _entry_row(entry, alf_ip if isinstance(alf_ip, str) else None)
            if isinstance(row, str):
                errors.add(f"{prefix} entry[{position}] {row}")
                refused_entries += 1
                continue
            group.rows.append(row)
        if group.rows:
            groups.append(group)
        else:
            refused_alfs += 1
    return Prepared(
        sent=len(alfs),
        groups=groups,
        errors=errors.finish(),
        error_count=errors.count,
        refused_alfs=refused_alfs,
        refused_entries=refused_entries,
        unauthorized=unauthorized,
    )


def _count_entries(alf: object) -> int:
    if not isinstance(alf, dict):
        return 0
    har = alf.get("har")
    log = har.get("log") if isinstance(har, dict) else None
    entries = log.get("entries") if isinstance(log, dict) else None
    return len(entries) if isinstance(entries, list) else 0
