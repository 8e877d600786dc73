"""Route templates: the path of a request with its id-like segments folded to ``{id}``.

``/users/42`` and ``/users/43`` are one endpoint, ``/users/{id}``. A segment is folded when
it is a number, a UUID, a hex string of 8 characters or more with a digit in it (object
ids, hashes), or a base64/base64url-like string of 16 characters or more with both digits
and letters (opaque ids and tokens). Anything else is kept as it is, so ``/v1/users`` and
``/api/items/latest`` stay readable.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Final

__all__ = ["ID", "fold_route"]

ID: Final = "{id}"

_NUMBER: Final = re.compile(r"[+-]?\d+(?:\.\d+)?")
_UUID: Final = re.compile(
    r"[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}"
)
_HEX: Final = re.compile(r"(?=[^/]*\d)[0-9a-fA-F]{8,}")
_OPAQUE: Final = re.compile(r"(?=[^/]*\d)(?=[^/]*[A-Za-z])[A-Za-z0-9_\-+=%.~]{16,}")


def _fold_segment(segment: str) -> str:
    if not segment:
        return segment
    if (
        _NUMBER.fullmatch(segment)
        or _UUID.fullmatch(segment)
        or _HEX.fullmatch(segment)
        or _OPAQUE.fullmatch(segment)
    ):
        return ID
    return segment


@lru_cache(maxsize=4096)
def fold_route(path: str) -> str:
    """``/api/items/42/parts/9f86d081884c`` -> ``/api/items/{id}/parts/{id}``."""
    return "/".join(_fold_segment(segment) for segment in path.split("/"))
