"""In-process cost of one variant: the app called directly, no server in between.

Run as a child process, one per (variant, framework, scenario, round), so that peers'
global state and threads never meet.  The ASGI app is awaited with a prebuilt scope and
minimal receive/send callables in one event loop; the WSGI callable is called with a
prebuilt environ and a no-op start_response, its result iterated and closed.  Only the
call itself is timed (copying the scope/environ happens before the clock starts).

Reported, per request:
- time on the request path: median (and p90) of each request's wall time, and the mean
  wall time per request: the whole timed loop's wall time over the number of requests, so
  every moment the app's thread waited for the GIL while the worker ran beside it is in
  (what a saturated server pays, where the median hides it);
- CPU: ``time.process_time`` of the whole process (all threads) from the first timed
  request until the sink has received every event those requests produced, after the
  variant's own flush, divided by the number of requests;
- for the streamed response, the delay to the first body byte, and in a separate pass
  after the timed one the peak memory (tracemalloc, all threads) of one request together
  with the variant's flush of its event, for a 1 MiB and a 4 MiB response: memory that
  stays flat does not grow with the response.

The result is one JSON object on the last line of stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import gc
import io
import json
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

from apps import make_app
from common import (
    RESPONSE_BODY_4K,
    SCENARIOS,
    STREAM_4MIB,
    STREAM_CHUNK,
    STREAM_CHUNKS,
    Scenario,
    SinkClient,
    request_headers,
)
from sink import running_sink
from variants import Unavailable, Wrapped, build, events_per_request

perf_ns = time.perf_counter_ns
# Longer than any peer's batching delay once flushed (moesifwsgi cuts a batch within 2 s).
STALL_S = 4.0


def expected_body_len(sc: Scenario) -> int:
    if sc.name == "post":
        return len(RESPONSE_BODY_4K)
    if sc.name == "stream":
        return STREAM_CHUNK * STREAM_CHUNKS
    if sc.name == "stream4":
        return 4 * STREAM_CHUNK * STREAM_CHUNKS
    return 0  # small JSON: any non-empty body


# ---------------------------------------------------------------- ASGI driving


def asgi_scope(sc: Scenario) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": sc.method,
        "scheme": "http",
        "path": sc.path,
        "raw_path": sc.path.encode(),
        "query_string": sc.query.encode(),
        "root_path": "",
        "headers": [(k.encode(), v.encode()) for k, v in request_headers(sc.name)],
        "client": ("127.0.0.1", 54321),
        "server": ("127.0.0.1", 8000),
    }


class Exchange:
    """receive/send for one ASGI request; records status, body size, first-byte time."""

    __slots__ = ("body", "done", "status", "size", "first_ns")

    def __init__(self, body: bytes) -> None:
        self.body: bytes | None = body
        self.done = asyncio.Event()
        self.status = 0
        self.size = 0
        self.first_ns = 0

    async def receive(self) -> dict[str, Any]:
        body = self.body
        if body is not None:
            self.body = None
            return {"type": "http.request", "body": body, "more_body": False}
        await self.done.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == "http.response.body":
            chunk = message.get("body", b"")
            if chunk and not self.first_ns:
                self.first_ns = perf_ns()
            self.size += len(chunk)
            if not message.get("more_body", False):
                self.done.set()
        elif kind == "http.response.start":
            self.status = message["status"]


class Lifespan:
    """Runs the app's lifespan protocol around the measurement, as a server would."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.outbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
        try:
            await self.app(scope, self.inbox.get, self.outbox.put)
        except Exception as exc:  # app without lifespan support
            await self.outbox.put({"type": "failed", "message": repr(exc)})

    async def startup(self) -> None:
        self.task = asyncio.ensure_future(self._run())
        await self.inbox.put({"type": "lifespan.startup"})
        await asyncio.wait_for(self.outbox.get(), 10)

    async def shutdown(self) -> None:
        if self.task is None or self.task.done():
            return
        await self.inbox.put({"type": "lifespan.shutdown"})
        try:
            await asyncio.wait_for(self.outbox.get(), 30)
        except asyncio.TimeoutError:
            pass


class AsgiDriver:
    def __init__(self, app: Any, sc: Scenario) -> None:
        self.app = app
        self.sc = sc
        self.scope = asgi_scope(sc)

    async def one(self) -> tuple[int, int, int, int]:
        """(t0, t_end, t_first_byte, status) for one request; raises on a bad response."""
        ex = Exchange(self.sc.body)
        scope = dict(self.scope)
        t0 = perf_ns()
        await self.app(scope, ex.receive, ex.send)
        t1 = perf_ns()
        check(self.sc, ex.status, ex.size)
        return t0, t1, ex.first_ns, ex.status

    async def many(self, n: int, out: list[tuple[int, int, int]]) -> None:
        one = self.one
        for _ in range(n):
            t0, t1, tf, _ = await one()
            out.append((t0, t1, tf))


# ---------------------------------------------------------------- WSGI driving


def wsgi_environ(sc: Scenario) -> dict[str, Any]:
    env: dict[str, Any] = {
        "REQUEST_METHOD": sc.method,
        "SCRIPT_NAME": "",
        "PATH_INFO": sc.path,
        "QUERY_STRING": sc.query,
        "SERVER_NAME": "api.example.test",
        "SERVER_PORT": "80",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1",
        "REMOTE_PORT": "54321",
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": "http",
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": False,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
    }
    for k, v in request_headers(sc.name):
        if k == "content-type":
            env["CONTENT_TYPE"] = v
        elif k == "content-length":
            env["CONTENT_LENGTH"] = v
        else:
            env["HTTP_" + k.upper().replace("-", "_")] = v
    return env


class WsgiDriver:
    def __init__(self, app: Any, sc: Scenario) -> None:
        self.app = app
        self.sc = sc
        self.environ = wsgi_environ(sc)
        self.status = ""

    def start_response(self, status: str, headers: Any, exc_info: Any = None) -> Callable[..., Any]:
        self.status = status
        return _write

    def one(self) -> tuple[int, int, int, int]:
        env = dict(self.environ)
        env["wsgi.input"] = io.BytesIO(self.sc.body)
        start_response = self.start_response
        t0 = perf_ns()
        result = self.app(env, start_response)
        first = 0
        size = 0
        try:
            for chunk in result:
                if chunk and not first:
                    first = perf_ns()
                size += len(chunk)
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()
        t1 = perf_ns()
        status = int(self.status.split(" ", 1)[0])
        check(self.sc, status, size)
        return t0, t1, first, status

    def many(self, n: int, out: list[tuple[int, int, int]]) -> None:
        one = self.one
        for _ in range(n):
            t0, t1, tf, _ = one()
            out.append((t0, t1, tf))


def _write(data: bytes) -> None:
    return None


def check(sc: Scenario, status: int, size: int) -> None:
    want = expected_body_len(sc)
    if status != 200 or (want and size != want) or size == 0:
        raise RuntimeError(f"bad response: status {status}, {size} body bytes (want {want})")


# ---------------------------------------------------------------- measurement


class Runner:
    """Drives either kind of app with one synchronous interface."""

    def __init__(self, framework: str, wrapped: Wrapped, sc: Scenario) -> None:
        self.framework = framework
        self.app = wrapped.app
        self.sc = sc
        self.loop = asyncio.new_event_loop()
        self.lifespan: Lifespan | None = None
        if framework == "starlette":
            self.lifespan = Lifespan(wrapped.app)
            self.loop.run_until_complete(self.lifespan.startup())
        self.asgi, self.wsgi = self.drivers(sc)

    def drivers(self, sc: Scenario) -> tuple[AsgiDriver | None, WsgiDriver | None]:
        if self.framework == "starlette":
            return AsgiDriver(self.app, sc), None
        return None, WsgiDriver(self.app, sc)

    def many(self, n: int, sc: Scenario | None = None) -> list[tuple[int, int, int]]:
        asgi, wsgi = (self.asgi, self.wsgi) if sc is None else self.drivers(sc)
        out: list[tuple[int, int, int]] = []
        if asgi is not None:
            self.loop.run_until_complete(asgi.many(n, out))
        else:
            assert wsgi is not None
            wsgi.many(n, out)
        return out

    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run a (blocking) flush with the loop able to run other callbacks meanwhile."""
        if self.asgi is not None:
            self.loop.run_until_complete(self.loop.run_in_executor(None, fn))
            # (moesif's ASGI drain and others are thread-safe; none need the loop)
        else:
            fn()

    def close(self) -> None:
        if self.lifespan is not None:
            self.loop.run_until_complete(self.lifespan.shutdown())
        self.loop.close()


def wait_delivered(
    sink: SinkClient, target_events: int, timeout: float, reflush: Callable[[], None]
) -> tuple[float, tuple[int, int, int], bool]:
    """Poll the sink (backing off) until ``target_events`` arrived.

    While something is missing the variant is asked to flush again every second, as its
    own timer would.  Gives up when nothing more arrived for ``STALL_S`` seconds: a peer
    that dropped events (apitally's span queue drops the oldest when full) never catches up.
    Returns the process CPU time read just before the poll that saw everything (so the
    polls after the data arrived are not charged), the sink totals, and success.
    """
    deadline = time.monotonic() + timeout
    last_flush = last_change = time.monotonic()
    last_count = -1
    pause = 0.005
    while True:
        cpu = time.process_time()
        totals = sink.totals()
        if totals[2] >= target_events:
            return cpu, totals, True
        now = time.monotonic()
        if totals[2] != last_count:
            last_count, last_change = totals[2], now
        if now > deadline or now - last_change > STALL_S:
            return cpu, totals, False
        if now - last_flush >= 1.0:
            reflush()
            last_flush = time.monotonic()
        time.sleep(pause)
        pause = min(pause * 1.5, 0.2)


def peak_per_request(
    runner: Runner, sc: Scenario, requests: int, flush: Callable[[], None]
) -> float:
    """Largest traced peak (KiB) of one request plus the flush of what it produced."""
    peaks = []
    for _ in range(requests):
        before = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        runner.many(1, sc)
        runner.call_soon(flush)
        peaks.append(tracemalloc.get_traced_memory()[1] - before)
    return max(peaks) / 1024


def stream_memory(runner: Runner, requests: int, flush: Callable[[], None]) -> dict[str, float]:
    """Peak memory of a 1 MiB and of a 4 MiB streamed request, and what stays afterwards."""
    runner.many(1, STREAM_4MIB)  # warm the longer path too
    runner.call_soon(flush)
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    peak_1 = peak_per_request(runner, runner.sc, requests, flush)
    peak_4 = peak_per_request(runner, STREAM_4MIB, requests, flush)
    gc.collect()
    retained = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    return {"peak_kib": peak_1, "peak4_kib": peak_4, "retained_kib": retained / 1024}


def measure(args: argparse.Namespace) -> dict[str, Any]:
    sc = SCENARIOS[args.scenario]
    sink = SinkClient(args.sink)
    app = make_app(args.framework)
    wrapped = build(args.variant, args.framework, app, args.sink, sc.bodies)
    per_req = events_per_request(args.variant, args.framework, args.scenario)
    runner = Runner(args.framework, wrapped, sc)
    try:
        # Warm-up, then let everything it produced reach the sink before the clock starts.
        pre = sink.totals()
        runner.many(args.warmup)
        runner.call_soon(wrapped.flush)
        reflush = functools.partial(runner.call_soon, wrapped.flush)
        if per_req:
            wait_delivered(sink, pre[2] + per_req * args.warmup, args.deliver_timeout, reflush)
        base = sink.totals()

        gc.collect()
        cpu0 = time.process_time()
        wall0 = perf_ns()
        samples = runner.many(args.requests)
        wall_loop = perf_ns() - wall0
        cpu_loop = time.process_time() - cpu0
        t_flush = time.perf_counter()
        runner.call_soon(wrapped.flush)
        target = base[2] + per_req * args.requests
        if per_req:
            cpu_end, totals, complete = wait_delivered(sink, target, args.deliver_timeout, reflush)
        else:
            cpu_end, totals, complete = time.process_time(), sink.totals(), True
        wait_s = time.perf_counter() - t_flush
        result: dict[str, Any] = {
            "status": "ok",
            "variant": args.variant,
            "framework": args.framework,
            "scenario": args.scenario,
            "config": wrapped.config,
            "requests": args.requests,
            "median_us": statistics.median(t1 - t0 for t0, t1, _ in samples) / 1000,
            "p90_us": quantile([t1 - t0 for t0, t1, _ in samples], 0.9) / 1000,
            "mean_us": wall_loop / args.requests / 1000,
            "sample_mean_us": statistics.fmean(t1 - t0 for t0, t1, _ in samples) / 1000,
            "cpu_path_us": cpu_loop * 1e6 / args.requests,
            "cpu_us": (cpu_end - cpu0) * 1e6 / args.requests,
            "delivered_events": totals[2] - base[2],
            "expected_events": per_req * args.requests,
            "delivered_requests": totals[0] - base[0],
            "delivered_bytes": totals[1] - base[1],
            "complete": complete,
            "deliver_wait_s": wait_s,
        }
        if args.variant.startswith("ours"):
            import alf_analytics

            result["ours_stats"] = alf_analytics.stats()
        if not per_req and result["delivered_events"]:
            n = result["delivered_events"]
            result["status"] = "error"
            result["reason"] = f"expected no events, the sink received {n} (option not applied?)"
        if sc.name == "stream":
            result["ttfb_us"] = statistics.median(tf - t0 for t0, _, tf in samples) / 1000
            result.update(stream_memory(runner, args.memory_requests, wrapped.flush))
        return result
    finally:
        runner.close()


def quantile(values: list[int], q: float) -> float:
    values = sorted(values)
    return float(values[min(len(values) - 1, int(q * len(values)))])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--variant", required=True)
    p.add_argument("--framework", choices=["starlette", "flask"], required=True)
    p.add_argument("--scenario", choices=list(SCENARIOS), required=True)
    p.add_argument("--sink", help="the sink's URL (default: start one for this run)")
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--memory-requests", type=int, default=5)
    p.add_argument("--deliver-timeout", type=float, default=30.0)
    args = p.parse_args()
    try:
        with running_sink(args.sink) as args.sink:
            result = measure(args)
    except Unavailable as exc:
        result = {"status": "n/a", "reason": str(exc)}
    except Exception as exc:
        import traceback

        traceback.print_exc()
        result = {"status": "error", "reason": f"{type(exc).__name__}: {exc}"}
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
