"""Flushing at SIGTERM for servers that skip ``atexit``, and the one warning when we cannot.

Python's default SIGTERM action ends the process at once, without ``atexit``: ``flask run``,
``python app.py`` (wsgiref, waitress), a container stopped by its runtime, and uvicorn (which
re-raises SIGTERM after its own shutdown) all lose the entries still queued, unless the ASGI
lifespan shutdown flushed them. :func:`install_sigterm_flush` is the opt-in fix;
:func:`check_exit_flush` logs one warning per process when a request shows it is needed.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

from . import _worker
from ._config import MAX_SECONDS

__all__ = ["install_sigterm_flush"]

logger = logging.getLogger("alf_analytics")

_Handler = Callable[[int, FrameType | None], Any] | int | None

#: Set once an ASGI lifespan startup went through our middleware or FlushOnShutdown.
lifespan_seen = False
#: Set once FlushOnShutdown saw a scope (Django under ASGI).
flush_wrapper_seen = False
_warned = False
_installed = False


def _default_timeout() -> float:
    return _worker.largest_shutdown_timeout(5.0)


class _FlushThenChain:
    """The SIGTERM handler: flush within the timeout, then do what the previous one did."""

    def __init__(self, previous: _Handler, timeout: float | None) -> None:
        self.previous = previous
        self.timeout = timeout

    def __call__(self, signum: int, frame: FrameType | None) -> Any:
        timeout = self.timeout if self.timeout is not None else _default_timeout()
        timeout = _worker.shutdown_bound(timeout)  # shared with atexit and lifespan flushes
        # On a thread: the signal may have interrupted this (main) thread while it held a lock
        # the flush needs (a request handing over its entry); the wait stays bounded anyway.
        flusher = threading.Thread(
            target=_flush_quietly, args=(timeout,), name="alf-analytics-sigterm", daemon=True
        )
        flusher.start()
        flusher.join(timeout + 1.0)
        previous = self.previous
        if callable(previous):
            return previous(signum, frame)
        if previous == signal.SIG_IGN:
            return None
        # SIG_DFL (or a handler not installed from Python): die of the signal, as without us.
        signal.signal(signum, signal.SIG_DFL)
        signal.raise_signal(signum)
        return None


def _flush_quietly(timeout: float) -> None:
    try:
        if not _worker.flush(timeout):
            logger.warning(
                "alf_analytics: SIGTERM: not every queued entry was sent in %.1fs", timeout
            )
    except Exception:
        logger.warning("alf_analytics: SIGTERM: flush failed", exc_info=True)


def install_sigterm_flush(timeout: float | None = None) -> None:
    """Flush queued entries when the process gets SIGTERM, then chain to the previous handler.

    For servers that end on SIGTERM without running ``atexit`` (``flask run``,
    ``python app.py``, uvicorn with ``--lifespan off``, a container's stop signal). The wait is
    bounded by ``timeout`` (default: the largest ``shutdown_timeout`` of the middlewares
    created so far, else 5 s). Afterwards the previous handler runs; when there was none, the
    signal's default action ends the process as it would have without us. Call it once from
    the main thread, at startup; calling it again does nothing.
    """
    if timeout is not None and (
        isinstance(timeout, bool)
        or not isinstance(timeout, (int, float))
        or not 0 <= timeout <= MAX_SECONDS  # NaN fails this too
    ):
        raise ValueError(
            f"alf_analytics: install_sigterm_flush(timeout={timeout!r}): must be None or a "
            f"number of seconds >= 0 and <= {MAX_SECONDS}"
        )
    previous = signal.getsignal(signal.SIGTERM)
    if isinstance(previous, _FlushThenChain):
        return
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError(
            "alf_analytics.install_sigterm_flush() must be called from the main thread "
            "(Python installs signal handlers there only)"
        )
    signal.signal(signal.SIGTERM, _FlushThenChain(previous, timeout))
    global _installed
    # A server may put its own handler in front while it serves (uvicorn does, then puts ours
    # back and re-raises the signal to it): ours still runs at the end.
    _installed = True


def _warn(message: str, *args: Any) -> None:
    global _warned
    if not _warned:
        _warned = True
        logger.warning(message, *args)


def check_exit_flush_wsgi(server_software: object) -> None:
    """First WSGI request under a real server: will anything flush at SIGTERM?"""
    if (
        _warned
        or _installed
        or not server_software
        or "uwsgi" in sys.modules
        or "mod_wsgi" in sys.modules
    ):
        return  # a test client (no SERVER_SOFTWARE), or an embedding server that finalizes
    handler = signal.getsignal(signal.SIGTERM)
    if handler == signal.SIG_DFL:
        _warn(
            "alf_analytics: this server (%s) ends on SIGTERM without running atexit, so entries "
            "still queued then are lost; call alf_analytics.install_sigterm_flush() at startup "
            "(README: Shutdown)",
            str(server_software)[:60],
        )


def check_exit_flush_asgi() -> None:
    """First ASGI request: no lifespan startup seen, and a server known to skip atexit."""
    if _warned or _installed or lifespan_seen:
        return
    handler = signal.getsignal(signal.SIGTERM)
    module = getattr(handler, "__module__", None) or ""
    if module.startswith("uvicorn"):
        _warn(
            "alf_analytics: no ASGI lifespan (uvicorn --lifespan off, or the app refused it): "
            "uvicorn re-raises SIGTERM without running atexit, so entries still queued then are "
            "lost; serve with lifespan on, or call alf_analytics.install_sigterm_flush() at "
            "startup (README: Shutdown)"
        )


def check_django_asgi() -> None:
    """First Django request under ASGI: is the application wrapped in FlushOnShutdown?"""
    if _warned or flush_wrapper_seen:
        return
    _warn(
        "alf_analytics: Django under ASGI without FlushOnShutdown: Django refuses the lifespan "
        "protocol, so under a server that exits without atexit (uvicorn) entries still queued "
        "when it stops are lost. In asgi.py: application = "
        "FlushOnShutdown(get_asgi_application())  (from alf_analytics.asgi import "
        "FlushOnShutdown)"
    )
