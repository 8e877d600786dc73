"""Helpers for the tests that run real servers (uvicorn, gunicorn, PostgreSQL) as processes."""

from __future__ import annotations

import signal
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager


def free_port() -> int:
    """A loopback port nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def sigterm(process: subprocess.Popen[bytes], timeout: float = 30.0) -> bytes:
    """Stop a server as its supervisor would (SIGTERM) and return what it wrote to stderr."""
    process.send_signal(signal.SIGTERM)
    return process.communicate(timeout=timeout)[1]


@contextmanager
def reaped(process: subprocess.Popen[bytes]) -> Iterator[subprocess.Popen[bytes]]:
    """Kill the process on the way out if it is still running, whatever the test did."""
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
