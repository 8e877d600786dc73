"""Drivers shared by the Django and equivalence tests.

``call_wsgi``/``call_asgi`` run an application in-process on a hand-built environ or scope, the
way a server would (iterate and ``close()``; ``receive`` that reports a disconnect only after the
response), so the request is exactly what the test wrote. ``Server`` runs a real server as a
subprocess on a socket bound here (no free-port race) and stops it with SIGTERM.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import httpx

REPO_ROOT = Path(__file__).resolve().parents[2]
PACKAGE = __name__.rpartition(".")[0]


def call_wsgi(app: Any, environ: dict[str, Any]) -> tuple[str, list[tuple[str, str]], bytes]:
    """Serve one request: status line, headers and body bytes, with ``close()`` called."""
    started: list[Any] = []

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        started[:] = [status, headers]
        return lambda data: None

    result = app(environ, start_response)
    try:
        body = b"".join(result)
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            close()
    return started[0], started[1], body


async def call_asgi(
    app: Any, scope: dict[str, Any], body_parts: Sequence[bytes], *, leave_at: str = ""
) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """Serve one ``http`` request: status, raw headers and body bytes (status 0: none sent).

    The client disconnects after the response, or with ``leave_at="request"`` right after the
    request body, or with ``leave_at="body"`` once the first body bytes were sent.
    """
    messages: list[dict[str, Any]] = [
        {"type": "http.request", "body": part, "more_body": index < len(body_parts) - 1}
        for index, part in enumerate(body_parts or [b""])
    ]
    done = asyncio.Event()
    if leave_at == "request":
        done.set()
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop(0)
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        if message["type"] == "http.response.body":
            if not message.get("more_body", False) or (leave_at == "body" and message["body"]):
                done.set()

    await app(scope, receive, send)
    start = next((m for m in sent if m["type"] == "http.response.start"), {"status": 0})
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], list(start.get("headers", [])), body


def server_env(collector_url: str) -> dict[str, str]:
    """Environment for a server subprocess serving this project."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ALF_", "DJANGO_"))}
    env["DJANGO_SETTINGS_MODULE"] = f"{PACKAGE}.settings"
    env["ALF_COLLECTOR_URL"] = collector_url
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


class Server:
    """A server subprocess on a loopback socket that this process bound and listens on."""

    def __init__(self, argv_for_fd: Iterable[str], env: dict[str, str]) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.sock.set_inheritable(True)
        fd = self.sock.fileno()
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.log = tempfile.TemporaryFile()
        argv = [arg.replace("{fd}", str(fd)) for arg in argv_for_fd]
        self.process = subprocess.Popen(
            [sys.executable, "-m", *argv],
            cwd=REPO_ROOT,
            env=env,
            pass_fds=(fd,),
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, path: str = "/sync", timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise AssertionError(f"server exited early:\n{self.output()}")
            try:
                # The socket is listening already: this waits until the app answers.
                httpx.get(self.url + path, timeout=timeout)
                return
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise AssertionError(f"server not ready:\n{self.output()}") from None
                time.sleep(0.05)

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM, then wait for the exit code (killed after ``timeout``)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"server ignored SIGTERM:\n{self.output()}") from None
        finally:
            self.sock.close()

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.sock.close()
        self.log.close()
