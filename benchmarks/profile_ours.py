"""cProfile of our variant: the request path and the worker thread, top 20 functions.

Shown in BENCHMARKS.md when a target is missed, so the reason is visible.  The request
path is profiled on the main thread while the in-process driver calls the wrapped app
(GET scenario, bodies off); each worker thread is profiled by installing a profiler inside
it when it starts (``threading.setprofile`` runs our hook first in every new thread).
Times are CPU time of the profiled thread (``time.thread_time``), so a blocking socket read
or a wait for the GIL costs nothing here.  Profiling slows everything down several times:
read the shares, not the absolute times.

Prints one JSON object {title: text} on the last line of stdout.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import sys
import threading
import time
from typing import Any

from apps import make_app
from common import SCENARIOS
from inprocess import Runner
from sink import running_sink
from variants import build


def top(profiles: list[cProfile.Profile], n: int = 20) -> str:
    buf = io.StringIO()
    stats = pstats.Stats(*profiles, stream=buf)
    stats.strip_dirs().sort_stats("tottime").print_stats(n)
    lines = buf.getvalue().splitlines()
    start = next((i for i, line in enumerate(lines) if "ncalls" in line), 0)
    header = [line for line in lines[:start] if "function calls" in line]
    return "\n".join(header + lines[start:]).rstrip()


def profile(framework: str, sink: str, requests: int) -> dict[str, str]:
    # One profiler per thread of ours (the worker may run several: one clock each, since
    # thread_time is per thread), merged for the report.
    worker_profiles: list[cProfile.Profile] = []

    def start_in_thread(frame: Any, event: str, arg: Any) -> None:
        sys.setprofile(None)
        if threading.current_thread().name.startswith("alf-analytics"):
            profile = cProfile.Profile(time.thread_time)
            worker_profiles.append(profile)
            profile.enable()

    threading.setprofile(start_in_thread)
    wrapped = build("ours", framework, make_app(framework), sink, False)
    runner = Runner(framework, wrapped, SCENARIOS["get"])
    runner.many(200)
    request_profile = cProfile.Profile(time.thread_time)
    request_profile.enable()
    runner.many(requests)
    request_profile.disable()
    runner.call_soon(wrapped.flush)
    runner.close()
    threading.setprofile(None)
    return {
        f"{framework}: request path, GET, bodies off ({requests:,} requests, by own time)": top(
            [request_profile]
        ),
        f"{framework}: worker threads for the same requests (by own time)": (
            top(worker_profiles) if worker_profiles else "no thread of ours ran"
        ),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--framework", choices=["starlette", "flask"], required=True)
    p.add_argument("--sink", help="the sink's URL (default: start one for this run)")
    p.add_argument("--requests", type=int, default=5000)
    a = p.parse_args()
    try:
        with running_sink(a.sink) as url:
            result = profile(a.framework, url, a.requests)
    except Exception as exc:
        result = {f"{a.framework} profile": f"failed: {type(exc).__name__}: {exc}"}
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
