"""`make demo`: the example apps under real servers, recorded by alf-analytics, end to end.

What it does, all on 127.0.0.1:

1. starts the ALF collector service (``alf-analytics collector``, SQLite in ``.demo/``), which
   accepts only the demo's service token and guards its dashboard and read API with a read
   key made up for this run;
2. starts the Flask example under gunicorn (2 pre-forked workers), the Starlette example under
   uvicorn, and the Django example under gunicorn (WSGI, threads) and under uvicorn (ASGI), each
   with its own ``ALF_ENVIRONMENT`` so the summary tells them apart;
3. sends a few hundred varied requests to each (JSON CRUD, query strings, binary and multipart
   uploads, errors, 404s, streamed responses, server-sent events), several at a time, most with
   the ``X-Api-Key`` of one of five accounts, which each app records as the consumer (the
   account's name, never the key);
4. stops the servers with SIGTERM: each flushes its queued entries on the way out (the ASGI
   lifespan shutdown, or the ``atexit`` hook);
5. checks that the collector holds exactly one entry per request answered, with the same
   method, path and status, that each account's requests are its consumer's (and that no API
   key reached the collector), and prints ``alf-analytics summary``;
6. prints the dashboard's URL and the read key to log in with. Run from a terminal, it keeps
   the collector running until Ctrl-C so you can look; without one (CI, scripts) it stops it
   and exits at once.

It exits 0 when every entry arrived and every server stopped cleanly, 1 otherwise.
Usage: ``python examples/demo.py [--requests N] [--workdir DIR]``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from alf_analytics.collector import summarize

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
TOKEN = "alf-demo-token"
#: The name the collector shows for the demo's token (``--token demo=...``).
SERVICE = "demo"
DEMO_BODY_TYPES = ",".join(
    [
        *("application/json", "application/*+json", "application/x-www-form-urlencoded"),
        *("application/xml", "application/*+xml", "text/*", "application/octet-stream"),
        "multipart/form-data",
    ]
)
PYTHON = sys.executable
CONCURRENCY = 8
# Servers print the address they bound (we ask each for port 0, so there is no port race).
LISTENING = re.compile(r"(?:Listening at:|running on|listening on) (http://127\.0\.0\.1:\d+)")

UVICORN_EXITS = (0, -signal.SIGTERM)
#: The accounts calling the examples, with their API keys (the examples' ``API_KEYS``) and
#: their share of the traffic; the rest of it is anonymous (no key, no consumer).
ACCOUNTS = {
    "acme": ("demo-key-acme-1f3a", 35),
    "globex": ("demo-key-globex-7c2d", 22),
    "initech": ("demo-key-initech-90be", 14),
    "umbrella": ("demo-key-umbrella-44d1", 9),
    "hooli": ("demo-key-hooli-b6e8", 5),
}
ANONYMOUS_SHARE = 15
Key = tuple[str, str, int]  # (method, path, status)


@dataclass
class Server:
    """One child process: the collector or an example app under a real server."""

    name: str
    description: str
    command: list[str]
    environment: str | None = None
    multipart: bool = True
    #: Exit statuses after SIGTERM: uvicorn (0.29+) re-raises the signal once it has shut down.
    clean_exits: tuple[int, ...] = (0,)
    process: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    url: str = ""
    answered: Counter[Key] = field(default_factory=Counter)
    #: Requests answered per account that sent its API key.
    consumers: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)

    def start(self, workdir: Path, env: dict[str, str]) -> None:
        self.log_path = workdir / f"{self.name}.log"
        with self.log_path.open("wb") as log:
            # A session of its own: gunicorn's workers can be cleaned up with the master.
            self.process = subprocess.Popen(
                self.command,
                cwd=ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def log_text(self) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text("utf-8", "replace")

    def wait_for_url(self, deadline: float) -> str:
        assert self.process is not None
        while time.monotonic() < deadline:
            match = LISTENING.search(self.log_text())
            if match:
                self.url = match.group(1)
                return self.url
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}")
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} did not report its address in time")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """Last resort, in ``finally``: SIGKILL whatever is left of this child's session."""
        if self.process is None:
            return
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            pass


def _shown(path: Path) -> str:
    """``path`` relative to the repository when it is inside it."""
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return str(path)


def say(message: str) -> None:
    print(f"[demo] {message}", flush=True)


def example_servers() -> list[Server]:
    gunicorn = [PYTHON, "-m", "gunicorn", "--bind", "127.0.0.1:0", "--graceful-timeout", "15"]
    uvicorn = [PYTHON, "-m", "uvicorn", "--host", "127.0.0.1", "--port", "0", "--no-access-log"]
    uvicorn += ["--timeout-graceful-shutdown", "10"]
    return [
        Server(
            "flask",
            "Flask under gunicorn (WSGI, 2 pre-forked workers)",
            [*gunicorn, "--workers", "2", "--chdir", str(EXAMPLES / "flask_app"), "app:app"],
            environment="flask-demo",
        ),
        Server(
            "starlette",
            "Starlette under uvicorn (ASGI, lifespan flush)",
            [*uvicorn, "--app-dir", str(EXAMPLES / "starlette_app"), "app:app"],
            environment="starlette-demo",
            clean_exits=UVICORN_EXITS,
            multipart=False,  # the example streams raw bodies; multipart needs python-multipart
        ),
        Server(
            "django",
            "Django under gunicorn (WSGI, 4 threads)",
            [
                *gunicorn,
                *("--workers", "1", "--threads", "4"),
                *("--chdir", str(EXAMPLES / "django_app"), "mysite.wsgi"),
            ],
            environment="django-demo",
        ),
        Server(
            "django-asgi",
            "Django under uvicorn (ASGI, async stack, lifespan flush)",
            [
                *uvicorn,
                *("--app-dir", str(EXAMPLES / "django_app")),
                "mysite.asgi:application",
            ],
            environment="django-asgi-demo",
            clean_exits=UVICORN_EXITS,
        ),
    ]


# -- traffic -----------------------------------------------------------------------------------


@dataclass
class Call:
    method: str
    path: str
    params: list[tuple[str, str]] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)
    stream: bool = False
    consumer: str | None = None


def plan(rng: random.Random, count: int, multipart: bool) -> list[Call]:
    """``count`` varied requests, the same mix for every framework."""
    names = ["widget", "gadget", "sprocket", "gizmo", "doohickey", "thingamajig"]
    tags = ["red", "blue", "new", "sale"]

    def item() -> dict[str, Any]:
        return {
            "name": rng.choice(names),
            "price": round(rng.uniform(1, 100), 2),
            "tags": rng.sample(tags, rng.randint(0, 2)),
        }

    def binary() -> bytes:
        # Some bigger than max_body_bytes (64 KiB): the entry shows a body captured to the cap.
        return rng.randbytes(rng.choice([128, 2048, 20_000, 100_000]))

    makers: list[tuple[int, Any]] = [
        (
            10,
            lambda: Call("GET", "/api/items", [("limit", str(rng.randint(1, 5))), ("offset", "0")]),
        ),
        (12, lambda: Call("GET", f"/api/items/{rng.randint(1, 2)}")),
        (4, lambda: Call("GET", "/api/items/999999")),
        (12, lambda: Call("POST", "/api/items", kwargs={"json": item()})),
        (3, lambda: Call("POST", "/api/items", kwargs={"content": b'{"name": oops', **_json})),
        (6, lambda: Call("PUT", "/api/items/3", kwargs={"json": item()})),
        (4, lambda: Call("DELETE", "/api/items/3")),
        (
            12,
            lambda: Call(
                "GET",
                "/api/search",
                [("q", rng.choice(["", "g", "widget"]))]
                + [("tag", tag) for tag in rng.sample(tags, rng.randint(0, 2))]
                + [("page", str(rng.randint(1, 3)))],
            ),
        ),
        (10, lambda: _raw_upload(binary())),
        (5, lambda: _multipart(binary()) if multipart else _raw_upload(binary())),
        # uvicorn closes the connection after an app exception (Starlette re-raises after its
        # 500): ask for that up front so the client never reuses a connection being closed.
        (4, lambda: Call("GET", "/api/boom", kwargs={"headers": {"Connection": "close"}})),
        (4, lambda: Call("GET", "/nope")),
        (7, lambda: Call("GET", "/api/stream", [("chunks", str(rng.randint(1, 50)))], stream=True)),
        (5, lambda: Call("GET", "/api/events", [("count", str(rng.randint(1, 5)))], stream=True)),
        (2, lambda: Call("GET", "/health", kwargs={"headers": {"Authorization": "Bearer s3cret"}})),
    ]
    weights = [weight for weight, _ in makers]
    callers: list[str | None] = [*ACCOUNTS, None]
    shares = [share for _, share in ACCOUNTS.values()] + [ANONYMOUS_SHARE]
    calls = []
    for _ in range(count):
        call = rng.choices(makers, weights)[0][1]()
        call.consumer = rng.choices(callers, shares)[0]
        if call.consumer is not None:
            key = ACCOUNTS[call.consumer][0]
            call.kwargs["headers"] = {**call.kwargs.get("headers", {}), "X-Api-Key": key}
        calls.append(call)
    return calls


_json = {"headers": {"Content-Type": "application/json"}}


def _raw_upload(data: bytes) -> Call:
    headers = {"Content-Type": "application/octet-stream"}
    return Call("POST", "/api/upload", kwargs={"content": data, "headers": headers})


def _multipart(data: bytes) -> Call:
    files = {"file": ("payload.bin", data, "application/octet-stream")}
    return Call("POST", "/api/upload", kwargs={"files": files})


async def send_one(client: httpx.AsyncClient, call: Call) -> int:
    if call.stream:
        async with client.stream(call.method, call.path, params=call.params, **call.kwargs) as r:
            async for _ in r.aiter_bytes():
                pass
            return r.status_code
    response = await client.request(call.method, call.path, params=call.params, **call.kwargs)
    return response.status_code


async def drive(server: Server, calls: list[Call]) -> None:
    """Send ``calls`` to ``server``, ``CONCURRENCY`` at a time, counting what was answered."""
    limits = httpx.Limits(max_connections=CONCURRENCY)
    gate = asyncio.Semaphore(CONCURRENCY)
    async with httpx.AsyncClient(base_url=server.url, limits=limits, timeout=30.0) as client:

        async def one(call: Call) -> None:
            async with gate:
                try:
                    status = await send_one(client, call)
                except httpx.HTTPError as exc:
                    server.failures.append(f"{call.method} {call.path}: {exc!r}")
                    return
                server.answered[(call.method, call.path, status)] += 1
                if call.consumer is not None:
                    server.consumers[call.consumer] += 1

        await asyncio.gather(*(one(call) for call in calls))


async def drive_all(servers: list[Server], plans: dict[str, list[Call]], timeout: float) -> None:
    traffic = asyncio.gather(*(drive(server, plans[server.name]) for server in servers))
    await asyncio.wait_for(traffic, timeout)


def wait_until_answering(server: Server, deadline: float) -> None:
    """Poll ``/health`` until the app answers (those probes are recorded like any request)."""
    while time.monotonic() < deadline:
        assert server.process is not None
        if server.process.poll() is not None:
            raise RuntimeError(f"{server.name} exited with {server.process.returncode}")
        try:
            response = httpx.get(f"{server.url}/health", timeout=10.0)
        except httpx.ConnectError:
            time.sleep(0.1)
            continue
        server.answered[("GET", "/health", response.status_code)] += 1
        if response.status_code == 200:
            return
        time.sleep(0.1)
    raise RuntimeError(f"{server.name} did not answer /health in time")


# -- the collector's side ----------------------------------------------------------------------


def stored(db: Path) -> dict[str | None, Counter[Key]]:
    """What the collector holds, per environment, as counts of (method, path, status)."""
    result: dict[str | None, Counter[Key]] = {}
    if not db.exists():
        return result
    for row in summarize(str(db)).rows:
        key = (row.method or "-", row.path or "-", row.status or 0)
        result.setdefault(row.environment, Counter())[key] += row.count
    return result


def wait_for_entries(db: Path, servers: list[Server], timeout: float) -> dict[Any, Counter[Key]]:
    deadline = time.monotonic() + timeout
    while True:
        held = stored(db)
        done = all(
            sum(held.get(s.environment, Counter()).values()) >= sum(s.answered.values())
            for s in servers
        )
        if done or time.monotonic() > deadline:
            return held
        time.sleep(0.2)


def describe(counter: Counter[int]) -> str:
    return ", ".join(f"{status}: {counter[status]}" for status in sorted(counter))


def check_consumers(url: str, read_key: str, servers: list[Server]) -> list[str]:
    """Each account's requests are its consumer's in the collector (``/api/consumers``), and no
    API key is in any stored entry (the examples record the account, and redact the header)."""
    problems = []
    headers = {"Authorization": f"Bearer {read_key}"}
    with httpx.Client(base_url=url, headers=headers, timeout=30.0) as client:
        for server in servers:
            params = {"environment": server.environment, "limit": 100}
            rows = client.get("/api/consumers", params=params).raise_for_status().json()
            held = {row["consumer"]: row["count"] for row in rows["consumers"]}
            shown = ", ".join(f"{name} {count}" for name, count in server.consumers.most_common())
            verdict = "OK" if held == dict(server.consumers) else "MISMATCH"
            say(f"{server.name:<12} consumers {shown}: {verdict}")
            if verdict != "OK":
                sent = dict(server.consumers)
                problems.append(f"{server.name}: consumers sent {sent}, collector holds {held}")
            export = client.get("/api/export.har", params={"environment": server.environment})
            har = export.raise_for_status().text
            leaked = [name for name, (key, _) in ACCOUNTS.items() if key in har]
            if leaked:
                problems.append(f"{server.name}: the API key of {', '.join(leaked)} was stored")
    return problems


# -- main --------------------------------------------------------------------------------------


def run(requests: int, workdir: Path) -> int:
    started = time.monotonic()
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    db = workdir / "alf.sqlite"
    read_key = secrets.token_urlsafe(18)
    collector = Server(
        "collector",
        "the ALF collector service",
        [PYTHON, "-m", "alf_analytics.cli", "collector", "--host", "127.0.0.1"]
        + ["--port", "0", "--db", str(db), "--token", f"{SERVICE}={TOKEN}"],
    )
    servers = example_servers()
    env = {key: value for key, value in os.environ.items() if not key.startswith("ALF_")}
    env["PYTHONUNBUFFERED"] = "1"
    env["DJANGO_SETTINGS_MODULE"] = "mysite.settings"  # whatever the calling shell had
    problems: list[str] = []
    try:
        say(f"starting {collector.description} (db: {_shown(db)})")
        # The read key goes by the environment: a command line is visible to every user.
        collector.start(workdir, {**env, "ALF_COLLECTOR_READ_KEY": read_key})
        collector.wait_for_url(time.monotonic() + 15)
        say(f"  collector listening on {collector.url}")

        app_env = {**env, "ALF_SERVICE_TOKEN": TOKEN, "ALF_COLLECTOR_URL": collector.url}
        # The default text-like body types plus uploads: the dashboard shows binary ones as sizes.
        app_env["ALF_LOG_BODY_TYPES"] = DEMO_BODY_TYPES
        for server in servers:
            assert server.environment is not None
            say(f"starting {server.description}, ALF_ENVIRONMENT={server.environment}")
            server.start(workdir, {**app_env, "ALF_ENVIRONMENT": server.environment})
        deadline = time.monotonic() + 30
        for server in servers:
            server.wait_for_url(deadline)
            wait_until_answering(server, deadline)
            say(f"  {server.name} answering on {server.url}")

        say(f"sending {requests} requests to each app, {CONCURRENCY} at a time ...")
        rng = random.Random(20_161)
        t0 = time.monotonic()
        plans = {s.name: plan(random.Random(rng.random()), requests, s.multipart) for s in servers}
        asyncio.run(drive_all(servers, plans, timeout=60))
        say(f"  done in {time.monotonic() - t0:.1f} s")
        for server in servers:
            statuses: Counter[int] = Counter()
            for (_, _, status), count in server.answered.items():
                statuses[status] += count
            say(f"  {server.name:<12} statuses {describe(statuses)}")
            for failure in server.failures[:5]:
                problems.append(f"{server.name}: request failed: {failure}")

        say("stopping the apps with SIGTERM: each flushes its queued entries as it exits ...")
        for server in servers:
            server.stop()
        for server in servers:
            assert server.process is not None
            try:
                code = server.process.wait(25)
            except subprocess.TimeoutExpired:
                problems.append(f"{server.name} did not stop within 25 s of SIGTERM")
                continue
            if code not in server.clean_exits:
                problems.append(f"{server.name} exited with status {code}")
            # The agent logs to the "alf_analytics" logger only; unconfigured, Python prints its
            # warnings bare. A healthy run has none.
            lines = server.log_text().splitlines()
            warnings = [line for line in lines if line.startswith("alf_analytics")]
            problems.extend(f"{server.name} log: {line}" for line in warnings[:5])

        say("waiting for the collector to hold every entry ...")
        held = wait_for_entries(db, servers, timeout=15)

        command = [PYTHON, "-m", "alf_analytics.cli", "summary", "--db", str(db)]
        say(f"alf-analytics summary --db {_shown(db)}")
        print(flush=True)
        subprocess.run(command, cwd=ROOT, check=True, timeout=30)
        print(flush=True)

        for server in servers:
            sent = sum(server.answered.values())
            got = held.get(server.environment, Counter())
            line = f"{server.name:<12} sent {sent} requests, collector holds {sum(got.values())}"
            if got == server.answered:
                say(f"{line} entries: OK")
                continue
            say(f"{line} entries: MISMATCH")
            missing = server.answered - got
            extra = got - server.answered
            for key, count in sorted(missing.items()):
                problems.append(f"{server.name}: {count} x {' '.join(map(str, key))} missing")
            for key, count in sorted(extra.items()):
                problems.append(f"{server.name}: {count} x {' '.join(map(str, key))} unexpected")
        if not problems:
            problems.extend(check_consumers(collector.url, read_key, servers))
        if not problems:
            say(f"all entries arrived in {time.monotonic() - started:.1f} s")
            show_dashboard(collector, read_key)
    except Exception as exc:  # report, clean up, exit non-zero
        problems.append(f"{type(exc).__name__}: {exc}")
    finally:
        for child in [*servers, collector]:
            child.stop()
        for child in [*servers, collector]:
            child.kill()

    say(f"server logs are in {_shown(workdir)}/")
    if problems:
        for problem in problems:
            say(f"PROBLEM: {problem}")
        for child in [collector, *servers]:
            if child.process is not None and child.process.returncode not in (0, None):
                say(f"last lines of {child.log_path}:")
                print("\n".join(child.log_text().splitlines()[-20:]), flush=True)
        say(f"FAILED after {time.monotonic() - started:.1f} s")
        return 1
    say(f"look again later: .venv/bin/alf-analytics summary --db {_shown(db)}, or")
    say(f"  .venv/bin/alf-analytics collector --db {_shown(db)} and open http://127.0.0.1:8700/")
    return 0


def show_dashboard(collector: Server, read_key: str) -> None:
    """Print where the dashboard is; from a terminal, keep the collector up until Ctrl-C."""
    say(f"dashboard: {collector.url}/")
    say(f"read key:  {read_key}")
    if not sys.stdin.isatty():
        say("no terminal: stopping the collector (run `make demo` from a terminal to look)")
        return
    say("open the dashboard and log in with the read key; Ctrl-C stops the collector")
    assert collector.process is not None
    try:
        code = collector.process.wait()
    except KeyboardInterrupt:
        print(flush=True)
        say("Ctrl-C: stopping the collector")
        return
    raise RuntimeError(f"the collector exited with status {code} while the dashboard was up")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=300, help="requests per app (300)")
    parser.add_argument(
        "--workdir", type=Path, default=ROOT / ".demo", help="scratch directory, emptied first"
    )
    args = parser.parse_args(argv)
    return run(args.requests, args.workdir.resolve())


if __name__ == "__main__":
    sys.exit(main())
