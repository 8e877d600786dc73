"""The app a real server loads: one variant, chosen by environment variables.

uvicorn (``server_app:app`` with BENCH_FRAMEWORK=starlette) and gunicorn (with
BENCH_FRAMEWORK=flask) import this module; BENCH_VARIANT names the variant and BENCH_SINK
the loopback sink it sends to.  Bodies are off: the server scenario is the GET.

For our variant, BENCH_STATS_FILE names a file that receives ``alf_analytics.stats()`` as
JSON when the server shuts down (after a flush bounded by 10 s), so the run can tell
entries dropped as ``queue_full`` from entries still on their way: at exit for gunicorn's
worker, at the end of the Starlette app's lifespan for uvicorn (which re-raises SIGTERM
after its shutdown, so ``atexit`` never runs there).  Nothing is added to the request path.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import sys
from collections.abc import AsyncIterator
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from apps import make_app
from variants import build

_framework = os.environ["BENCH_FRAMEWORK"]
_variant = os.environ["BENCH_VARIANT"]
_inner = make_app(_framework)
_wrapped = build(_variant, _framework, _inner, os.environ["BENCH_SINK"], False)
app = _wrapped.app


def _write_stats(path: str) -> None:
    import alf_analytics

    delivered = alf_analytics.flush(timeout=10.0)
    stats = dict(alf_analytics.stats(), pid=os.getpid(), flush_delivered=delivered)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(stats, f)
    os.replace(tmp, path)


def _stats_at_lifespan_end(path: str) -> None:
    original = _inner.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[Any]:
        async with original(app) as state:
            yield state
        _write_stats(path)

    _inner.router.lifespan_context = lifespan


if _variant.startswith("ours") and os.environ.get("BENCH_STATS_FILE"):
    if _framework == "starlette":
        _stats_at_lifespan_end(os.environ["BENCH_STATS_FILE"])
    else:
        atexit.register(_write_stats, os.environ["BENCH_STATS_FILE"])
