"""install_sigterm_flush(): SIGTERM flushes queued entries, then does what it did before."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from alf_analytics.collector import Collector

ROOT = Path(__file__).parent.parent

SCRIPT = """
import os, signal, sys
from werkzeug.test import Client
import alf_analytics
from alf_analytics import AnalyticsWSGIMiddleware

def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok"]

{before}
middleware = AnalyticsWSGIMiddleware(
    app, service_token="sigterm-token-0123456789", collector_url=sys.argv[1], delay=300.0
)
alf_analytics.install_sigterm_flush()
alf_analytics.install_sigterm_flush()  # twice: still one flush, one chain
for _ in range(3):
    Client(middleware).get("/").close()
print("queued", flush=True)
os.kill(os.getpid(), signal.SIGTERM)
signal.pause() if hasattr(signal, "pause") else None
print("not reached")
"""


def run(collector: Collector, before: str = "") -> subprocess.CompletedProcess[str]:
    code = textwrap.dedent(SCRIPT).replace("{before}", textwrap.dedent(before))
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run(
        [sys.executable, "-c", code, collector.url],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.slow
def test_sigterm_flushes_then_dies_of_the_signal(collector: Collector) -> None:
    """No previous handler: the entries are delivered, and the process ends by SIGTERM."""
    done = run(collector)
    assert done.returncode == -signal.SIGTERM, done.stderr
    assert "not reached" not in done.stdout
    assert collector.wait_for_entries(3, 10.0), collector.count()


@pytest.mark.slow
def test_sigterm_flushes_then_chains_to_the_previous_handler(collector: Collector) -> None:
    before = """
    def previous(signum, frame):
        print("previous handler ran", flush=True)
        sys.exit(7)

    signal.signal(signal.SIGTERM, previous)
    """
    done = run(collector, before)
    assert done.returncode == 7, done.stderr
    assert done.stdout.count("previous handler ran") == 1
    assert collector.wait_for_entries(3, 10.0), collector.count()


def test_install_outside_the_main_thread_is_refused() -> None:
    import threading

    import alf_analytics

    errors: list[BaseException] = []

    def install() -> None:
        try:
            alf_analytics.install_sigterm_flush()
        except RuntimeError as exc:
            errors.append(exc)

    thread = threading.Thread(target=install)
    thread.start()
    thread.join()
    assert len(errors) == 1 and "main thread" in str(errors[0])


@pytest.mark.parametrize("timeout", [float("inf"), float("nan"), 1e300, True, -1, "5"])
def test_install_refuses_a_timeout_the_handler_could_not_wait(timeout: object) -> None:
    """Refused at install, not at SIGTERM, where it raised into the main thread (exit 1)."""
    import alf_analytics

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(ValueError, match="install_sigterm_flush"):
        alf_analytics.install_sigterm_flush(timeout)  # type: ignore[arg-type]
    assert signal.getsignal(signal.SIGTERM) is before
