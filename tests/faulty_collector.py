"""A real ALF collector on loopback that misbehaves on command (for the fault-injection tests).

It speaks HTTP/1.1 over raw sockets, so every byte it sends is under the test's control, and it
can be switched at runtime between::

    healthy()                        store every ALF, answer 200 like the reference collector
    refuse()                         stop listening (connections are refused), drop open ones
    blackhole()                      accept and read requests, never answer
    slow(seconds, store=True)        store, then answer 200 after ``seconds``
    fail(status, times=None, ...)    answer ``status`` (with Retry-After, a body, headers)
                                     K times
    too_large_above(size)            413 when the decompressed body is larger than ``size``
    reject_containing(marker)        400 (storing nothing) when the decompressed body holds
                                     ``marker``, as a validating collector refuses a batch
                                     with one bad entry
    partial()                        store, answer 207 with per-ALF errors
    not_json()                       store, answer 200 with an HTML body
    cut(times=None)                  read the request, store nothing, close mid-response
    one_per_connection(linger)       store and answer 200 (kept alive), then read nothing more
                                     and close after ``linger`` s: a keep-alive timeout that
                                     crosses the client's next request

Modes with ``times`` return to healthy after that many requests. It counts TCP connections and
records every request (so tests can check batches, sizes on the wire and connection reuse).
"""

from __future__ import annotations

import gzip
import json
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

_REASONS = {
    200: "OK",
    203: "Non-Authoritative Information",
    301: "Moved Permanently",
    302: "Found",
    307: "Temporary Redirect",
    308: "Permanent Redirect",
    207: "Multi-Status",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    413: "Payload Too Large",
    429: "Too Many Requests",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


@dataclass
class SeenRequest:
    """One HTTP request as the collector read it, and what it did about it."""

    connection: int
    method: str
    path: str
    headers: dict[str, str]
    wire_bytes: int
    body: bytes
    received: float
    mode: str
    status: int | None = None
    answered: float | None = None


@dataclass
class StoredALF:
    token: str
    environment: str | None
    entries: list[dict[str, Any]] = field(repr=False)


@dataclass
class _Mode:
    name: str = "healthy"
    times: int | None = None
    status: int = 200
    retry_after: str | None = None
    body: bytes = b""
    content_type: str = "application/json"
    seconds: float = 0.0
    store: bool = True
    size: int = 0
    marker: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()


class FaultyCollector:
    """See the module docstring. Use as a context manager."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = 0
        self._cond = threading.Condition()
        self._mode = _Mode()
        self._stopped = threading.Event()
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._open_sockets: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self.connections = 0
        self.requests: list[SeenRequest] = []
        self.alfs: list[StoredALF] = []
        self._listen()

    # -- lifecycle ----------------------------------------------------------------------------

    def __enter__(self) -> FaultyCollector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _listen(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.host, self.port))
        listener.listen(128)
        self.port = listener.getsockname()[1]
        self._listener = listener
        thread = threading.Thread(
            target=self._accept, args=(listener,), name="faulty-collector", daemon=True
        )
        self._accept_thread = thread
        thread.start()

    def _unlisten(self) -> None:
        listener, self._listener = self._listener, None
        if listener is None:
            return
        try:
            listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() below on Linux
        except OSError:
            pass
        listener.close()
        if self._accept_thread is not None:
            self._accept_thread.join(5)

    def _drop_connections(self) -> None:
        with self._cond:
            sockets = list(self._open_sockets)
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def stop(self) -> None:
        self._stopped.set()
        with self._cond:
            self._cond.notify_all()
        self._unlisten()
        self._drop_connections()
        for thread in list(self._threads):
            thread.join(5)

    # -- modes --------------------------------------------------------------------------------

    def _set(self, mode: _Mode) -> None:
        with self._cond:
            self._mode = mode
            self._cond.notify_all()

    def healthy(self) -> None:
        if self._listener is None and not self._stopped.is_set():
            self._listen()
        self._set(_Mode())

    def refuse(self) -> None:
        self._set(_Mode("refused"))
        self._unlisten()
        self._drop_connections()

    def blackhole(self) -> None:
        self._set(_Mode("blackhole"))

    def slow(self, seconds: float, *, store: bool = True) -> None:
        self._set(_Mode("slow", seconds=seconds, store=store))

    def fail(
        self,
        status: int,
        times: int | None = None,
        *,
        retry_after: str | None = None,
        body: bytes = b"",
        content_type: str = "application/json",
        headers: tuple[tuple[str, str], ...] = (),
    ) -> None:
        if not body:
            body = json.dumps({"errors": [f"injected {status}"]}).encode()
        self._set(
            _Mode(
                "fail",
                times=times,
                status=status,
                retry_after=retry_after,
                body=body,
                content_type=content_type,
                headers=headers,
            )
        )

    def too_large_above(self, size: int) -> None:
        self._set(_Mode("too_large", size=size))

    def reject_containing(self, marker: bytes) -> None:
        self._set(_Mode("reject_containing", marker=marker))

    def partial(self) -> None:
        self._set(_Mode("partial"))

    def not_json(self) -> None:
        self._set(_Mode("not_json"))

    def cut(self, times: int | None = None) -> None:
        self._set(_Mode("cut", times=times))

    # -- queries ------------------------------------------------------------------------------

    def one_per_connection(self, linger: float) -> None:
        self._set(_Mode("one_per_connection", seconds=linger))

    def entries(self) -> list[tuple[str, str | None, dict[str, Any]]]:
        """Every stored entry as (serviceToken, environment, entry), in arrival order."""
        with self._cond:
            return [(a.token, a.environment, e) for a in self.alfs for e in a.entries]

    def count(self) -> int:
        with self._cond:
            return sum(len(a.entries) for a in self.alfs)

    def wait_for_entries(self, n: int, timeout: float = 10.0) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: sum(len(a.entries) for a in self.alfs) >= n, timeout)

    def wait_for_requests(self, n: int, timeout: float = 10.0) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: len(self.requests) >= n, timeout)

    def seen(self) -> list[SeenRequest]:
        with self._cond:
            return list(self.requests)

    # -- serving ------------------------------------------------------------------------------

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                sock, _ = listener.accept()
            except OSError:
                return
            with self._cond:
                self.connections += 1
                number = self.connections
                self._open_sockets.add(sock)
            thread = threading.Thread(
                target=self._serve, args=(sock, number), name="faulty-collector-conn", daemon=True
            )
            self._threads.append(thread)
            thread.start()

    def _serve(self, sock: socket.socket, number: int) -> None:
        try:
            reader = sock.makefile("rb")
            while not self._stopped.is_set():
                request = self._read_request(reader, number)
                if request is None or not self._answer(sock, request):
                    break
        except OSError:
            pass
        finally:
            with self._cond:
                self._open_sockets.discard(sock)
            try:
                sock.close()
            except OSError:
                pass

    def _read_request(self, reader: Any, number: int) -> SeenRequest | None:
        line = reader.readline(65536)
        if not line:
            return None
        method, path, _ = line.decode("latin-1").split(" ", 2)
        headers: dict[str, str] = {}
        while True:
            raw = reader.readline(65536)
            if raw in (b"\r\n", b"\n", b""):
                break
            name, _, value = raw.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        body = reader.read(int(headers.get("content-length", "0")))
        with self._cond:
            mode = self._mode.name
        return SeenRequest(number, method, path, headers, len(body), body, time.monotonic(), mode)

    def _answer(self, sock: socket.socket, request: SeenRequest) -> bool:
        """Act on one request according to the mode; False to close the connection."""
        with self._cond:
            mode = self._mode
            if mode.times is not None:
                mode.times -= 1
                if mode.times <= 0:
                    self._mode = _Mode()
            self.requests.append(request)
            self._cond.notify_all()
        name = mode.name
        if name == "refused":  # a request that raced refuse(): the connection just dies
            return False
        if name == "blackhole":
            # Never answer: hold the connection until the client gives up or we stop.
            while not self._stopped.is_set():
                try:
                    sock.settimeout(0.1)
                    if not sock.recv(65536):
                        return False
                except TimeoutError:
                    continue
                except OSError:
                    return False
            return False
        if name == "cut":
            sock.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b'Content-Length: 64\r\n\r\n{"errors":['
            )
            self._mark(request, 200)
            return False
        if name == "fail":
            extra = {"Retry-After": mode.retry_after} if mode.retry_after is not None else {}
            extra.update(mode.headers)
            return self._send(sock, request, mode.status, mode.body, mode.content_type, extra)
        try:
            decoded = self._decode(request)
        except ValueError as exc:
            return self._send_json(sock, request, 400, {"errors": [str(exc)]})
        if name == "too_large" and len(decoded) > mode.size:
            message = f"body of {len(decoded)} bytes exceeds {mode.size}"
            return self._send_json(sock, request, 413, {"errors": [message]})
        if name == "reject_containing" and mode.marker in decoded:
            return self._send_json(sock, request, 400, {"errors": ["invalid entry in batch"]})
        try:
            alfs = self._parse(decoded)
        except ValueError as exc:
            return self._send_json(sock, request, 400, {"errors": [str(exc)]})
        if name != "slow" or mode.store:
            self._store(alfs)
        if name == "slow":
            if self._stopped.wait(mode.seconds):
                return False
        answer = {"errors": [], "sent": len(alfs), "saved": len(alfs)}
        if name == "partial":
            answer["errors"] = [f"alf {i}: injected per-ALF error" for i in range(len(alfs))]
            return self._send_json(sock, request, 207, answer)
        if name == "not_json":
            return self._send(sock, request, 200, b"<html>stored, thanks</html>", "text/html")
        answered = self._send_json(sock, request, 200, answer)
        if name == "one_per_connection":
            # Whatever the client sends meanwhile is never read: the close resets it.
            self._stopped.wait(mode.seconds)
            return False
        return answered

    @staticmethod
    def _decode(request: SeenRequest) -> bytes:
        if request.headers.get("content-encoding") == "gzip":
            try:
                return gzip.decompress(request.body)
            except (OSError, EOFError) as exc:
                raise ValueError(f"bad gzip: {exc}") from None
        return request.body

    @staticmethod
    def _parse(body: bytes) -> list[StoredALF]:
        data = json.loads(body)
        if not isinstance(data, list):
            raise ValueError("a batch must be a JSON array")
        alfs = []
        for alf in data:
            entries = alf["har"]["log"]["entries"]
            if alf.get("version") != "1.1.0" or not isinstance(entries, list):
                raise ValueError("not an ALF 1.1.0 object")
            if "environment" in alf and not isinstance(alf["environment"], str):
                raise ValueError("environment must be a string")
            alfs.append(StoredALF(alf["serviceToken"], alf.get("environment"), entries))
        return alfs

    def _store(self, alfs: list[StoredALF]) -> None:
        with self._cond:
            self.alfs.extend(alfs)
            self._cond.notify_all()

    def _mark(self, request: SeenRequest, status: int) -> None:
        with self._cond:
            request.status = status
            request.answered = time.monotonic()

    def _send_json(self, sock: socket.socket, request: SeenRequest, status: int, data: Any) -> bool:
        return self._send(sock, request, status, json.dumps(data).encode(), "application/json")

    def _send(
        self,
        sock: socket.socket,
        request: SeenRequest,
        status: int,
        body: bytes,
        content_type: str,
        extra: dict[str, str] | None = None,
    ) -> bool:
        head = [
            f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}",
            f"Content-Type: {content_type}",
            f"Content-Length: {len(body)}",
        ]
        head += [f"{name}: {value}" for name, value in (extra or {}).items()]
        self._mark(request, status)
        try:
            sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)
        except OSError:
            return False
        return True
