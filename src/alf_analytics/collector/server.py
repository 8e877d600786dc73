"""Serving the app: :class:`Collector` runs it under uvicorn in a thread (tests, local runs).

::

    with Collector() as collector:           # in-memory SQLite, 127.0.0.1, a free port
        ...                                  # point the agent at collector.url
        assert collector.wait_for_entries(3)
        [entry.status for entry in collector.entries(service_token="my-token")]

It is the real ASGI app (:func:`~.app.create_app`) behind the real server, so what a test
sees is what a deployment does. :meth:`Collector.requests` lists what the HTTP requests to
the ALF endpoints looked like; that record lives in memory in this helper only (bounded),
the collector itself stores nothing but valid entries.
"""

from __future__ import annotations

import collections
import socket
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from types import EllipsisType, TracebackType
from typing import Any, Final

import orjson
import uvicorn

from .app import RequestRecord, create_app
from .queries import utc_datetime
from .settings import SUPPORTED_VERSIONS, CollectorError, Limits, TokenSet, check_read_key
from .storage import Store, open_store
from .summary import Summary, summarize_store

__all__ = ["UVICORN_SETTINGS", "Collector", "StoredEntry", "uvicorn_config", "uvicorn_settings"]

_START_TIMEOUT: Final = 15.0
_POLL: Final = 0.05


@dataclass(frozen=True)
class StoredEntry:
    """One stored entry, with the ALF envelope fields it arrived with.

    ``entry`` is the entry object as received (``har.log.entries[i]``). The other fields are
    its indexed columns. ``client_ip_address`` is the entry's ``clientIPAddress`` (1.1.0) or,
    failing that, the ALF root's (1.0.0); ``consumer`` its ``x-alf-consumer`` header.
    """

    id: int
    received_at: datetime
    alf_version: str
    service_token: str
    environment: str | None
    creator: dict[str, Any] | None
    method: str
    url: str
    path: str
    status: int
    time_ms: float
    request_body_size: int
    response_body_size: int
    client_ip_address: str | None
    entry: dict[str, Any] = field(repr=False)
    route: str = ""
    host: str = ""
    consumer: str | None = None
    started_at: datetime | None = None
    ingest_id: int = 0
    alf_index: int = 0


UVICORN_SETTINGS: Final[dict[str, Any]] = {
    "lifespan": "on",
    "log_level": "warning",
    "access_log": False,
    "limit_concurrency": 100,
    "backlog": 256,
    "timeout_keep_alive": 15,
    "timeout_graceful_shutdown": 5,
    "h11_max_incomplete_event_size": 64 * 1024,
    "server_header": False,
    "proxy_headers": False,
}
"""The hardened uvicorn settings the collector runs with (one process or ``--workers``).

``limit_concurrency`` is the collector's: connections (and requests) served at once; see
:func:`uvicorn_settings` for what uvicorn is given."""


def uvicorn_settings(**options: Any) -> dict[str, Any]:
    """:data:`UVICORN_SETTINGS` with ``options``, as uvicorn takes them.

    uvicorn answers 503 once ``len(connections) >= limit_concurrency``, and counts the new
    connection among them: given N it serves N - 1. ``--limit-concurrency N`` means N
    connections served and the next one refused, so uvicorn is given N + 1."""
    settings = {**UVICORN_SETTINGS, **options}
    limit = settings.get("limit_concurrency")
    if isinstance(limit, int) and not isinstance(limit, bool):
        settings["limit_concurrency"] = limit + 1
    return settings


def uvicorn_config(app: Any, **options: Any) -> uvicorn.Config:
    """The uvicorn settings the collector runs with (hardened defaults, overridable)."""
    return uvicorn.Config(app, **uvicorn_settings(**options))


class Collector:
    """A real collector (the ASGI app under uvicorn) in a background thread.

    ``db`` is an SQLite path, ``:memory:`` (the default) or a ``postgresql://`` URL; the
    other arguments go to :func:`~.app.create_app`. ``max_body_bytes`` is a shortcut for
    ``limits=Limits(max_body_bytes=...)``. ``history`` bounds the :meth:`requests` record.
    """

    def __init__(
        self,
        db: str = ":memory:",
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        tokens: Iterable[str] = (),
        read_key: str | None = None,
        limits: Limits | None = None,
        max_body_bytes: int | None = None,
        history: int = 10_000,
        server_options: dict[str, Any] | None = None,
        **app_options: Any,
    ) -> None:
        if max_body_bytes is not None:
            limits = Limits(max_body_bytes=max_body_bytes)
        self.host = host
        self._port = port
        self._tokens = TokenSet.parse(tokens)
        check_read_key(read_key, self._tokens)  # as create_app would, before a store is open
        self._records: collections.deque[RequestRecord] = collections.deque(maxlen=history)
        self._answered = 0
        self._cond = threading.Condition()
        self._store: Store | None = open_store(db, tokens=self._tokens)
        self.app = create_app(
            self._store,
            tokens=self._tokens,
            read_key=read_key or "",
            limits=limits,
            observer=self._observe,
            **app_options,
        )
        self._server_options = server_options or {}
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None
        self._state = "new"

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> Collector:
        """Bind, serve in a daemon thread, wait until the app has started; returns self."""
        if self._state != "new":
            raise CollectorError(f"collector is {self._state}")
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self._port))
        except OSError:
            sock.close()
            raise
        self._socket = sock
        server = uvicorn.Server(uvicorn_config(self.app, **self._server_options))
        self._server = server
        self._thread = threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, name="alf-collector", daemon=True
        )
        self._state = "running"
        self._thread.start()
        deadline = time.monotonic() + _START_TIMEOUT
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise CollectorError("the collector app did not start (see the log)")
            time.sleep(0.005)
        return self

    def stop(self) -> None:
        """Stop serving and close the store. Safe to call repeatedly."""
        if self._state == "stopped":
            return
        self._state = "stopped"
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(15)
            if self._thread.is_alive() and self._server is not None:
                self._server.force_exit = True
                self._thread.join(5)
        if self._socket is not None:
            self._socket.close()
        with self._cond:
            if self._store is not None:
                self._store.close()
                self._store = None
            self._cond.notify_all()

    def __enter__(self) -> Collector:
        if self._state == "new":
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        """The bound port (the real one when constructed with ``port=0``)."""
        if self._socket is None:
            raise CollectorError("collector is not started")
        return int(self._socket.getsockname()[1])

    @property
    def url(self) -> str:
        """Base URL, such as ``http://127.0.0.1:54321`` (no trailing slash)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def endpoint(self, version: str = "1.1.0", kind: str = "batch") -> str:
        """Full URL of an ALF endpoint, such as ``http://127.0.0.1:54321/1.1.0/batch``."""
        if version not in SUPPORTED_VERSIONS or kind not in ("single", "batch"):
            raise ValueError(f"no endpoint for version {version!r} and kind {kind!r}")
        return f"{self.url}/{version}/{kind}"

    @property
    def store(self) -> Store:
        if self._store is None:
            raise CollectorError("collector is stopped (its store is closed)")
        return self._store

    # -- what arrived -----------------------------------------------------------------------

    def _observe(self, record: RequestRecord) -> None:
        with self._cond:
            self._records.append(record)
            self._answered += 1
            self._cond.notify_all()

    def entries(
        self,
        *,
        service_token: str | None = None,
        environment: str | None | EllipsisType = ...,
        alf_version: str | None = None,
    ) -> list[StoredEntry]:
        """Stored entries in arrival order, optionally filtered.

        ``environment``: a string matches it, ``None`` matches entries whose ALF had none,
        the default ``...`` matches all.
        """
        where: list[str] = []
        params: list[Any] = []
        if service_token is not None:
            where.append("s.token = ?")
            params.append(service_token)
        if environment is None:
            where.append("s.environment IS NULL")
        elif isinstance(environment, str):
            where.append("s.environment = ?")
            params.append(environment)
        if alf_version is not None:
            where.append("e.alf_version = ?")
            params.append(alf_version)
        sql = (
            "SELECT e.id, e.received, e.alf_version, s.token, s.environment, c.creator, "
            "e.method, e.path, e.status, e.time_ms, e.request_bytes, e.response_bytes, "
            "e.client_ip, d.entry, e.route, e.host, e.consumer, e.started, e.ingest_id, "
            "e.alf_index FROM entries e JOIN streams s ON s.id = e.stream_id "
            "JOIN entry_data d ON d.id = e.id LEFT JOIN creators c ON c.id = e.creator_id"
        )
        if where:
            sql += " WHERE " + " AND ".join(where)
        rows = self.store.fetchall(sql + " ORDER BY e.id", params)
        result = []
        for row in rows:
            entry = self.store.decode_entry(row[13])
            result.append(
                StoredEntry(
                    id=int(row[0]),
                    received_at=utc_datetime(int(row[1])),
                    alf_version=row[2],
                    service_token=row[3],
                    environment=row[4],
                    creator=orjson.loads(row[5]) if row[5] is not None else None,
                    method=row[6],
                    url=str(entry.get("request", {}).get("url", "")),
                    path=row[7],
                    status=int(row[8]),
                    time_ms=float(row[9]),
                    request_body_size=int(row[10]),
                    response_body_size=int(row[11]),
                    client_ip_address=row[12],
                    entry=entry,
                    route=row[14],
                    host=row[15],
                    consumer=row[16],
                    started_at=utc_datetime(int(row[17])),
                    ingest_id=int(row[18]),
                    alf_index=int(row[19]),
                )
            )
        return result

    def alfs(self, *, alf_version: str | None = None) -> list[dict[str, Any]]:
        """The stored entries regrouped into the ALF objects they arrived in, in order.

        Each holds ``version``, ``serviceToken``, ``environment`` (when it had one),
        ``har.log.creator`` and the stored entries of that ALF object (refused ones are not
        stored, so they are missing).
        """
        alfs: dict[tuple[int, int], dict[str, Any]] = {}
        for stored in self.entries(alf_version=alf_version):
            key = (stored.ingest_id, stored.alf_index)
            alf = alfs.get(key)
            if alf is None:
                alf = {"version": stored.alf_version, "serviceToken": stored.service_token}
                if stored.environment is not None:
                    alf["environment"] = stored.environment
                if (
                    stored.alf_version == "1.0.0"
                    and stored.client_ip_address
                    and "clientIPAddress" not in stored.entry
                ):
                    # The column came from the ALF root (the entry has no address of its own).
                    alf["clientIPAddress"] = stored.client_ip_address
                log: dict[str, Any] = {"entries": []}
                if stored.creator is not None:
                    log = {"creator": stored.creator, "entries": []}
                alf["har"] = {"log": log}
                alfs[key] = alf
            alf["har"]["log"]["entries"].append(stored.entry)
        return list(alfs.values())

    def requests(self) -> list[RequestRecord]:
        """The requests to the ALF endpoints answered so far (any status), oldest first."""
        with self._cond:
            return list(self._records)

    def count(self) -> int:
        """Number of stored entries."""
        return int(self.store.scalar("SELECT COUNT(*) FROM entries") or 0)

    def _wait(self, done: Any, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                if self._store is None:
                    return False
                if done():
                    return True
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(min(remaining, _POLL))

    def wait_for_entries(self, n: int, timeout: float = 10.0) -> bool:
        """Block until at least ``n`` entries are stored; ``False`` on timeout or stop."""
        return self._wait(lambda: self.count() >= n, timeout)

    def wait_for_requests(self, n: int, timeout: float = 10.0) -> bool:
        """Block until at least ``n`` ALF requests were answered; ``False`` on timeout or stop."""
        return self._wait(lambda: self._answered >= n, timeout)

    def clear(self) -> None:
        """Delete everything stored and the request record."""
        self.store.clear()
        with self._cond:
            self._records.clear()
            self._answered = 0
            self._cond.notify_all()

    def summary(self) -> Summary:
        """Entries grouped by environment, method, path and status, with time percentiles."""
        return summarize_store(self.store)
