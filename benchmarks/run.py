"""`make bench`: our middleware against the bare apps and every peer, in one run.

Runs, in order, each part in child processes of the benchmark venv (benchmarks/.venv,
built by benchmarks/setup.sh), all sending to one loopback sink:

1. in-process: a minimal Starlette and a minimal Flask app called directly, bare and
   wrapped by each variant, three scenarios, several interleaved rounds, one process per
   variant per round (``inprocess.py``); plus our middleware with a skipped path and with
   redaction off, for the cost of a skipped request and of redaction;
2. through a real server: uvicorn and gunicorn under wrk, requests/s and the share of
   entries that reached the sink (``servers.py``);
3. delivery under latency: one process, batch_size 100, a sink answering each POST after
   50 ms (``delivery.py``);
4. the worker alone: entries/s and bytes per entry (``worker_bench.py``);
5. memory with the collector down (``memory.py``);
6. the collector's ingest and dashboard query (``ingest.py``, when it exists);
7. a cProfile of our request path and worker (``profile_ours.py``), shown if a target is
   missed.

It prints the report and writes it to BENCHMARKS.md at the repository root (``--quick``
writes benchmarks/results/BENCHMARKS-quick-<date>.md instead, so a smoke run never
replaces real figures), with the raw results as JSON in benchmarks/results/.  Every
figure is printed with the command that reproduces it (each script runs on its own and
starts its own sink when ``--sink`` is not given).  Only one run at a time: a second one
waits for the first (two would measure each other).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import fcntl
import importlib.metadata
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")
sys.path.insert(0, HERE)

import report  # noqa: E402
import servers  # noqa: E402
from common import SCENARIOS  # noqa: E402
from sink import SinkProcess  # noqa: E402
from variants import DISTRIBUTIONS, LABELS, OURS_OPTIONS, VARIANTS, runs_in  # noqa: E402

PY = "benchmarks/.venv/bin/python"


@dataclass
class Plan:
    rounds: int
    requests: int
    warmup: int
    stream_requests: int
    stream_warmup: int
    server_rounds: int
    server_duration: float
    server_warmup: float
    connections: int
    worker_entries: int
    worker_entries_bodies: int
    memory_entries: int
    profile_requests: int
    ours_server_rounds: int  # bare and ours get more rounds: their ratio is a target
    delivery_seconds: float
    delivery_inflight: tuple[int | None, ...]  # None: the option's default
    # The bare app and our variants get more rounds and requests: their differences are
    # targets of a few µs (added CPU, a skipped request), and one process's figure moves by
    # more than that on a shared machine.
    ours_rounds: int = 1
    ours_requests: int = 800
    ours_stream_requests: int = 15


FULL = Plan(
    3, 3000, 300, 60, 10, 1, 4.0, 1.0, 8, 60_000, 20_000, 20_000, 5000, 3, 5.0, (None, 8, 1),
    ours_rounds=5, ours_requests=6000, ours_stream_requests=100,
)  # fmt: skip
QUICK = Plan(1, 800, 100, 15, 5, 1, 2.0, 1.0, 8, 10_000, 4_000, 5_000, 1000, 1, 2.0, (None,))
#: The variants that get ``ours_rounds`` and ``ours_requests``.
OURS_FAMILY = ("bare", "ours", *OURS_OPTIONS)
DELIVERY_LATENCY = 0.05
DELIVERY_RATE = 15_000.0  # offered: 1.5 × the 10,000 entries/s target


def display_command(script: str, args: list[str]) -> str:
    """The command that reproduces one child's figure on its own (it starts its own sink)."""
    shown: list[str] = []
    skip = False
    for a in args:
        if skip:
            skip = False
            continue
        if a == "--sink":
            skip = True
            continue
        shown.append(a)
    return shlex.join([PY, f"benchmarks/{script}", *shown])


class Runner:
    """Runs child scripts with the benchmark interpreter, logging their stderr."""

    def __init__(self, env: dict[str, str], log_path: str) -> None:
        self.env = env
        self.log_path = log_path

    def child(self, script: str, args: list[str], timeout: float = 300.0) -> dict[str, Any]:
        cmd = [sys.executable, os.path.join(HERE, script), *args]
        with open(self.log_path, "a") as log:
            log.write(f"\n$ {shlex.join(cmd)}\n")
            log.flush()
            try:
                proc = subprocess.run(
                    cmd, stdout=subprocess.PIPE, stderr=log, text=True, timeout=timeout,
                    env=self.env, cwd=HERE,
                )  # fmt: skip
            except subprocess.TimeoutExpired:
                return {"status": "error", "reason": f"timed out after {timeout:.0f} s"}
        lines = proc.stdout.strip().splitlines()
        try:
            result: dict[str, Any] = json.loads(lines[-1])
        except (IndexError, json.JSONDecodeError):
            result = {"status": "error", "reason": f"exit {proc.returncode}, see {self.log_path}"}
        result.setdefault("command", display_command(script, args))
        return result


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def ours_importable(env: dict[str, str]) -> bool:
    probe = subprocess.run(
        [sys.executable, "-c", "from alf_analytics import AnalyticsWSGIMiddleware, flush, stats"],
        env=env,
        capture_output=True,
    )
    return probe.returncode == 0


def run_inprocess(
    r: Runner, plan: Plan, sink: str, variants: list[str], frameworks: list[str]
) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    unavailable: set[tuple[str, str, str]] = set()
    scenario_names = list(SCENARIOS)
    for rnd in range(max(plan.rounds, plan.ours_rounds)):
        for fw in frameworks:
            for si, sc in enumerate(scenario_names):
                k = (rnd + si) % len(variants)
                for v in variants[k:] + variants[:k]:  # interleaved, rotated each round
                    if (v, fw, sc) in unavailable or not runs_in(v, sc):
                        continue
                    family = v in OURS_FAMILY
                    if rnd >= (plan.ours_rounds if family else plan.rounds):
                        continue
                    stream = sc == "stream"
                    if family:
                        requests = plan.ours_stream_requests if stream else plan.ours_requests
                    else:
                        requests = plan.stream_requests if stream else plan.requests
                    args = [
                        "--variant", v, "--framework", fw, "--scenario", sc, "--sink", sink,
                        "--requests", str(requests),
                        "--warmup", str(plan.stream_warmup if stream else plan.warmup),
                    ]  # fmt: skip
                    res = r.child("inprocess.py", args)
                    res.update(variant=v, framework=fw, scenario=sc, round=rnd)
                    results.append(res)
                    if res["status"] != "ok":
                        unavailable.add((v, fw, sc))
                        say(
                            f"  round {rnd + 1} {fw} {sc} {v}: {res['status']}: {res.get('reason')}"
                        )
                    else:
                        say(
                            f"  round {rnd + 1} {fw:9} {sc:6} {v:13} {res['median_us']:9.1f} µs "
                            f"cpu {res['cpu_us']:9.1f} µs  delivered "
                            f"{res['delivered_events']}/{res['expected_events']}"
                        )
    return results


def run_servers(
    plan: Plan,
    sink: str,
    variants: list[str],
    frameworks: list[str],
    log_path: str,
    unavailable: dict[tuple[str, str], str],
) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    variants = [v for v in variants if v not in OURS_OPTIONS]
    pair = [v for v in ("bare", "ours") if v in variants]
    peers = [v for v in variants if v not in pair]
    for rnd in range(max(plan.server_rounds, plan.ours_server_rounds)):
        for fw in frameworks:
            # The bare app and ours back to back (order alternating), so that their ratio,
            # a target, is taken under the same background load; then the peers, rotated.
            k = rnd % max(len(peers), 1)
            for v in (pair if rnd % 2 == 0 else pair[::-1]) + peers[k:] + peers[:k]:
                rounds = plan.ours_server_rounds if v in ("bare", "ours") else plan.server_rounds
                if rnd >= rounds:
                    continue
                if (v, fw) in unavailable:
                    if rnd == 0:
                        reason = unavailable[(v, fw)]
                        results.append(
                            {"status": "n/a", "reason": reason, "variant": v, "framework": fw}
                        )
                    continue
                res = servers.measure(
                    sys.executable, fw, v, sink, plan.server_duration, plan.server_warmup,
                    plan.connections, log_path,
                )  # fmt: skip
                res.update(variant=v, framework=fw, round=rnd)
                res["command"] = shlex.join(
                    [PY, "benchmarks/servers.py", "--framework", fw, "--variant", v,
                     "--duration", f"{plan.server_duration:g}",
                     "--warmup", f"{plan.server_warmup:g}",
                     "--connections", str(plan.connections)]
                )  # fmt: skip
                results.append(res)
                if res["status"] == "ok":
                    got = res["delivered_after_exit"]
                    say(
                        f"  round {rnd + 1} {fw:9} {v:13} {res['rps']:9.0f} req/s"
                        + ("" if v == "bare" else f"  sink received {got}/{res['served']}")
                    )
                else:
                    say(f"  round {rnd + 1} {fw:9} {v:13} {res['status']}: {res.get('reason')}")
    return results


def machine() -> dict[str, Any]:
    cpu = platform.processor() or "unknown CPU"
    mem_gib = 0.0
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal"):
                    mem_gib = int(line.split()[1]) / 2**20
                    break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": mem_gib,
        "platform": platform.platform(),
        "python": sys.version.split()[0] + f" ({platform.python_implementation()})",
    }


def versions() -> dict[str, str]:
    out: dict[str, str] = {}
    for v in VARIANTS:
        for dist in DISTRIBUTIONS[v]:
            try:
                out[dist] = importlib.metadata.version(dist)
            except importlib.metadata.PackageNotFoundError:
                out[dist] = "not installed"
    return out


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="~2-minute smoke run")
    p.add_argument("--variants", help=f"comma-separated subset of {','.join(VARIANTS)}")
    p.add_argument("--frameworks", default="starlette,flask")
    p.add_argument("--skip", default="", help="parts to skip: " + ",".join(PARTS))
    p.add_argument("--out", help="where to write the markdown report")
    p.add_argument(
        "--idle-wait",
        type=float,
        help="seconds to wait for other processes to calm down first (default 60, quick 0)",
    )
    return p.parse_args()


PARTS = ("inprocess", "servers", "delivery", "worker", "memory", "ingest", "profile")


def flag(on: bool, name: str) -> list[str]:
    return [name] if on else []


def run_worker(r: Runner, plan: Plan, sink: str) -> list[dict[str, Any]]:
    out = []
    for bodies, n in ((False, plan.worker_entries), (True, plan.worker_entries_bodies)):
        args = ["--sink", sink, "--entries", str(n), *flag(bodies, "--bodies")]
        res = r.child("worker_bench.py", args)
        out.append(res)
        rate = res.get("entries_per_cpu_s")
        say(
            f"  bodies={bodies}: " + (f"{rate:,.0f} entries/s per CPU-second" if rate else str(res))
        )
    return out


def run_delivery(r: Runner, plan: Plan) -> list[dict[str, Any]]:
    """Entries/s one process delivers to a sink answering each POST after 50 ms."""
    out = []
    sink = SinkProcess(sys.executable, RESULTS, DELIVERY_LATENCY)
    try:
        for inflight in plan.delivery_inflight:
            args = ["--sink", sink.url, "--latency", f"{DELIVERY_LATENCY:g}"]
            args += ["--rate", f"{DELIVERY_RATE:g}", "--seconds", f"{plan.delivery_seconds:g}"]
            if inflight is not None:
                args += ["--max-inflight", str(inflight)]
            res = r.child("delivery.py", args, timeout=180)
            out.append(res)
            if res.get("status") == "ok":
                say(
                    f"  max_inflight={res['max_inflight']}"
                    f"{'' if res['max_inflight_given'] else ' (default)'}: "
                    f"{res['delivered_per_s']:,.0f} entries/s delivered, "
                    f"{res['lost']:,} of {res['captured']:,} lost"
                )
            else:
                say(f"  max_inflight={inflight}: {res.get('status')}: {res.get('reason')}")
    finally:
        sink.stop()
    return out


INGEST = os.path.join(HERE, "ingest.py")


def run_ingest(r: Runner, plan: Plan, quick: bool) -> dict[str, Any]:
    """The collector's figures (benchmarks/ingest.py, written with the collector).

    Run with the project's .venv interpreter when there is one: the PostgreSQL part starts
    its server with tests/pg.py, which imports pytest (not in the benchmark venv).
    """
    if not os.path.exists(INGEST):
        return {"status": "n/a", "reason": "benchmarks/ingest.py does not exist yet"}
    project_python = os.path.join(ROOT, ".venv", "bin", "python")
    python = project_python if os.path.exists(project_python) else sys.executable
    args = ["--quick"] if quick else []
    cmd = [python, INGEST, *args]
    with open(r.log_path, "a") as log:
        log.write(f"\n$ {shlex.join(cmd)}\n")
        log.flush()
        try:
            proc = subprocess.run(
                cmd, stdout=subprocess.PIPE, stderr=log, text=True,
                timeout=200 if quick else 600, env=r.env, cwd=ROOT,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            return {"status": "error", "reason": "benchmarks/ingest.py timed out"}
    lines = proc.stdout.strip().splitlines()
    try:
        res: dict[str, Any] = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        res = {"status": "error", "reason": f"exit {proc.returncode}, see {r.log_path}"}
    for f in res.get("figures", []):
        say(f"  {f.get('name')}: {f.get('value')} {f.get('unit', '')}")
    if res.get("status") != "ok":
        say(f"  {res.get('status')}: {res.get('reason')}")
    return res


def run_memory(r: Runner, plan: Plan) -> list[dict[str, Any]]:
    out = []
    for mode in ("queued", "rss"):
        for bodies in (False, True):
            args = [
                "--mode",
                mode,
                "--entries",
                str(plan.memory_entries),
                *flag(bodies, "--bodies"),
            ]
            res = r.child("memory.py", args)
            out.append(res)
            value = res.get("bytes_per_entry", res.get("peak_rss_mib", res.get("reason")))
            say(f"  {mode} bodies={bodies}: {value}")
    return out


def run_profiles(r: Runner, plan: Plan, sink: str, frameworks: list[str]) -> dict[str, str]:
    profiles: dict[str, str] = {}
    for fw in frameworks:
        args = ["--framework", fw, "--sink", sink, "--requests", str(plan.profile_requests)]
        res = r.child("profile_ours.py", args)
        res.pop("command", None)
        profiles.update(res)
    return profiles


def cpu_busy(seconds: float = 1.0) -> float:
    """Share of the machine's CPU time spent busy over ``seconds`` (from /proc/stat)."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            values = [int(x) for x in f.readline().split()[1:]]
        return values[3] + values[4], sum(values)  # idle + iowait, total

    try:
        idle0, total0 = sample()
        time.sleep(seconds)
        idle1, total1 = sample()
    except OSError:
        return float("nan")
    return 1.0 - (idle1 - idle0) / max(total1 - total0, 1)


def wait_idle(max_wait: float) -> float:
    """Wait (up to ``max_wait`` s) until other processes leave the CPUs mostly idle."""
    deadline = time.monotonic() + max_wait
    busy = cpu_busy()
    while busy > 0.25 and time.monotonic() < deadline:
        say(f"machine busy ({busy:.0%} of the CPUs used by other processes), waiting")
        time.sleep(4)
        busy = cpu_busy()
    return busy


def raise_priority(step: int = 10) -> str:
    """Run this benchmark (and its children) ahead of other work on a shared machine.

    Other processes still run, but take less of the CPUs while a variant is measured, so
    the figures move less with them. Needs the right to lower niceness (root); otherwise
    the run goes on at normal priority.
    """
    try:
        os.nice(-step)
    except OSError:
        return ""
    return f"the run had priority over other processes (nice -{step})"


def load_average() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def git_revision() -> str:
    """The commit measured, and whether src/ had uncommitted changes."""

    def git(*args: str) -> str:
        out = subprocess.run(["git", "-C", ROOT, *args], capture_output=True, text=True)
        return out.stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--", "src")
    return head + (" with uncommitted changes in src/" if dirty else "")


def wrk_version() -> str:
    if servers.load_generator() != "wrk":
        return "benchmarks/loadgen.py (wrk not installed)"
    out = subprocess.run(["wrk", "--version"], capture_output=True, text=True).stdout
    return "wrk " + (out.split()[1] if len(out.split()) > 1 else "")


def child_env(notes: list[str]) -> dict[str, str]:
    """The environment of every child; falls back to src/ if the editable install is missing."""
    env = dict(os.environ)
    if not ours_importable(env):
        env["PYTHONPATH"] = os.pathsep.join(
            filter(None, [os.path.join(ROOT, "src"), env.get("PYTHONPATH")])
        )
        if ours_importable(env):
            os.environ["PYTHONPATH"] = env["PYTHONPATH"]  # the servers inherit os.environ
            notes.append("alf-analytics was not installed in the venv; imported from src/ instead.")
    return env


def unavailable_in(results: list[dict[str, Any]]) -> dict[tuple[str, str], str]:
    """(variant, framework) that could not even be built in-process, with the reason."""
    return {
        (r["variant"], r["framework"]): str(r.get("reason"))
        for r in results
        if r.get("status") == "n/a"
    }


def run_parts(
    args: argparse.Namespace, plan: Plan, r: Runner, sink: str, log_path: str
) -> dict[str, Any]:
    variants = args.variants.split(",") if args.variants else list(VARIANTS)
    if "bare" not in variants:
        variants.insert(0, "bare")
    frameworks = args.frameworks.split(",")
    skip = set(filter(None, args.skip.split(",")))
    res: dict[str, Any] = {
        "inprocess": [], "servers": [], "delivery": [], "worker": [], "memory": [], "ingest": {}
    }  # fmt: skip
    timings: dict[str, float] = {}
    parts = {
        "inprocess": lambda: run_inprocess(r, plan, sink, variants, frameworks),
        "servers": lambda: run_servers(
            plan, sink, variants, frameworks, log_path, unavailable_in(res["inprocess"])
        ),
        "delivery": lambda: run_delivery(r, plan),
        "worker": lambda: run_worker(r, plan, sink),
        "memory": lambda: run_memory(r, plan),
        "ingest": lambda: run_ingest(r, plan, args.quick),
        "profile": lambda: run_profiles(r, plan, sink, frameworks),
    }
    for name, fn in parts.items():
        ours_only = ("delivery", "worker", "memory", "profile")
        if name in skip or (name in ours_only and "ours" not in variants):
            continue
        say(f"{name}:")
        t0 = time.monotonic()
        res["profiles" if name == "profile" else name] = fn()
        timings[name] = time.monotonic() - t0
    res["timings"] = timings
    return res


def meta(
    args: argparse.Namespace, plan: Plan, duration: float, loads: list[float]
) -> dict[str, Any]:
    argv = [
        os.path.relpath(sys.executable, ROOT),
        os.path.relpath(os.path.join(HERE, "run.py"), ROOT),
    ]
    return {
        **machine(),
        "command": shlex.join(argv + sys.argv[1:]),
        "quick": args.quick,
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "duration_s": duration,
        "load_average": loads,
        "versions": versions(),
        "load_generator": wrk_version(),
        "rounds": plan.rounds,
        "requests": plan.requests,
        "warmup": plan.warmup,
        "stream_requests": plan.stream_requests,
        "ours_rounds": max(plan.rounds, plan.ours_rounds),
        "ours_requests": max(plan.requests, plan.ours_requests),
        "ours_stream_requests": max(plan.stream_requests, plan.ours_stream_requests),
        "server_rounds": plan.server_rounds,
        "ours_server_rounds": plan.ours_server_rounds,
        "delivery_seconds": plan.delivery_seconds,
        "server_duration": plan.server_duration,
        "server_warmup": plan.server_warmup,
        "connections": plan.connections,
    }


@contextlib.contextmanager
def exclusive_run() -> Any:
    """One benchmark at a time on this machine: two at once would measure each other."""
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, ".lock"), "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say("another benchmark run is in progress on this machine; waiting for it")
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def main() -> int:
    with exclusive_run():
        return run()


def run() -> int:
    args = parse_args()
    if not os.path.realpath(sys.prefix).startswith(os.path.realpath(os.path.join(HERE, ".venv"))):
        say("note: run.py expects benchmarks/.venv (benchmarks/setup.sh builds it)")
    plan = QUICK if args.quick else FULL
    tag = ("quick" if args.quick else "full") + dt.datetime.now().strftime("-%Y%m%d-%H%M%S")
    log_path = os.path.join(RESULTS, f"{tag}.log")
    open(log_path, "w").close()
    notes: list[str] = []
    runner = Runner(child_env(notes), log_path)
    revision = git_revision()
    idle_wait = args.idle_wait if args.idle_wait is not None else (0.0 if args.quick else 60.0)
    busy = wait_idle(idle_wait)
    priority = raise_priority()
    if priority:
        notes.append(priority)
    loads = [load_average()]
    started = time.monotonic()
    sink = SinkProcess(sys.executable, RESULTS)
    try:
        results = run_parts(args, plan, runner, sink.url, log_path)
    finally:
        sink.stop()
    duration = time.monotonic() - started
    loads.append(load_average())
    failed = {(r["variant"], r.get("reason")) for r in results["inprocess"] if r["status"] != "ok"}
    notes += [f"n/a: {LABELS[v]}: {reason}" for v, reason in sorted(failed)]
    results["notes"] = notes
    results["meta"] = meta(args, plan, duration, loads)
    results["meta"]["busy_at_start"] = busy
    results["meta"]["revision"] = revision
    with open(os.path.join(RESULTS, f"{tag}.json"), "w") as f:
        json.dump(results, f, indent=1)
    text = report.render(results)
    default = os.path.join(RESULTS, f"BENCHMARKS-{tag}.md") if args.quick else None
    out = args.out or default or os.path.join(ROOT, "BENCHMARKS.md")
    with open(out, "w") as f:
        f.write(text)
    print(text)
    headline = os.path.join(RESULTS, f"headline-{tag}.md")
    with open(headline, "w") as f:
        f.write(report.headline_for_readme(results))
    say(f"wrote {os.path.relpath(out, ROOT)} in {duration / 60:.1f} min")
    say(f"the README's headline table: {os.path.relpath(headline, ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
