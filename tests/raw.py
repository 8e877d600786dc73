"""Raw requests as servers present them: a WSGI environ (gunicorn's), an ASGI scope (uvicorn's).

Tests that call an app directly (no server, no client library in between) build the request
here, so every test sees the same shape of environ and scope.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

#: The ``Host`` header unless a test names another (``None``: it is among ``headers``).
HOST = "api.example.test"
CLIENT = ("192.0.2.10", 50123)
SERVER = ("127.0.0.1", 8000)

Headers = Sequence[tuple[str, str]]


def wsgi_environ(
    method: str,
    path: str,
    *,
    query: str = "",
    headers: Headers = (),
    body: bytes = b"",
    host: str | None = HOST,
    client: tuple[str, int] = CLIENT,
    server: tuple[str, int] = SERVER,
    target: str | None = None,
    length: bool = True,
    **extra: Any,
) -> dict[str, Any]:
    """A WSGI environ; ``target`` is the request line's target when it is not ``path``.

    ``CONTENT_LENGTH`` is the body's length when there is a body, unless ``length`` is false
    (a chunked request) or ``headers`` has its own. ``extra`` keys are set last.
    """
    environ: dict[str, Any] = {
        "REQUEST_METHOD": method,
        "SCRIPT_NAME": "",
        "PATH_INFO": path,
        "QUERY_STRING": query,
        "RAW_URI": (target or path) + (f"?{query}" if query else ""),
        "SERVER_NAME": server[0],
        "SERVER_PORT": str(server[1]),
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": client[0],
        "REMOTE_PORT": str(client[1]),
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(body),
        "wsgi.errors": io.StringIO(),
        "wsgi.multithread": False,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
    }
    if host is not None:
        environ["HTTP_HOST"] = host
    if body and length:
        environ["CONTENT_LENGTH"] = str(len(body))
    for name, value in headers:
        key = name.upper().replace("-", "_")
        # PEP 3333: text is the Latin-1 of the bytes; these two have no HTTP_ prefix.
        environ[key if key in ("CONTENT_TYPE", "CONTENT_LENGTH") else f"HTTP_{key}"] = value
    environ.update(extra)
    return environ


def asgi_scope(
    method: str,
    path: str,
    *,
    query: str = "",
    headers: Headers = (),
    body: bytes = b"",
    host: str | None = HOST,
    client: tuple[str, int] = CLIENT,
    server: tuple[str, int] = SERVER,
    target: str | None = None,
    length: bool = True,
    **extra: Any,
) -> dict[str, Any]:
    """An ASGI ``http`` scope; an absolute-form ``target`` stays in the path, as under h11.

    ``body`` is only measured: a ``content-length`` header is added for it unless ``length``
    is false (the body then arrives in messages of unknown total size).
    """
    pairs = [*([("host", host)] if host is not None else []), *headers]
    if body and length:
        pairs.append(("content-length", str(len(body))))
    path = target or path
    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode("ascii"),
        "query_string": query.encode("ascii"),
        "root_path": "",
        "headers": [(n.encode("latin-1"), v.encode("latin-1")) for n, v in pairs],
        "client": client,
        "server": server,
    }
    scope.update(extra)
    return scope
