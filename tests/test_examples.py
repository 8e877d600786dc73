"""The runnable examples: each app records what it serves, and `make demo` works end to end."""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import os
import pty
import queue
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
import warnings
from pathlib import Path
from types import ModuleType
from typing import IO

import httpx
import pytest

from alf_analytics.collector import Collector
from tests.conftest import received_entries

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
DJANGO_DIR = EXAMPLES / "django_app"
TOKEN = "example-test-token"
DEMO_ENVIRONMENTS = ("flask-demo", "starlette-demo", "django-demo", "django-asgi-demo")
#: One of the examples' API keys (each example's ``API_KEYS``) and its account.
API_KEY, ACCOUNT = "demo-key-globex-7c2d", "globex"
DEMO_ACCOUNTS = {"acme", "globex", "initech", "umbrella", "hooli"}


def header(message: dict[str, object], name: str) -> list[str]:
    """The values of the header ``name`` in an entry's request or response."""
    headers = message["headers"]
    assert isinstance(headers, list)
    return [str(h["value"]) for h in headers if str(h["name"]).lower() == name]


def load_example(path: Path, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """Import an example module from its file, under a fresh name (its state starts clean)."""
    name = f"alf_example_{path.parent.name}_{uuid.uuid4().hex}"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    return module


def test_the_examples_and_the_demo_use_one_key_table(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each example keeps its own copy of the API keys (so that it stands alone); the copies
    and the demo's ``ACCOUNTS`` must say the same, or the demo's consumer check goes wrong."""
    monkeypatch.setenv("ALF_ENABLED", "false")  # importing an app builds its middleware
    demo = load_example(EXAMPLES / "demo.py", monkeypatch)
    expected = {key: account for account, (key, _) in demo.ACCOUNTS.items()}
    assert expected[API_KEY] == ACCOUNT and set(expected.values()) == DEMO_ACCOUNTS
    for path in (
        EXAMPLES / "flask_app" / "app.py",
        EXAMPLES / "starlette_app" / "app.py",
        DJANGO_DIR / "mysite" / "accounts.py",
    ):
        assert load_example(path, monkeypatch).API_KEYS == expected, path


@pytest.fixture
def example_env(collector: Collector, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The ALF_* variables the examples read, pointing at the test collector."""
    values = {"ALF_SERVICE_TOKEN": TOKEN, "ALF_COLLECTOR_URL": collector.url}
    monkeypatch.delenv("ALF_LOG_BODY", raising=False)
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    return values


def decoded(message: dict[str, object]) -> bytes:
    """The bytes of a base64 ``postData`` or ``content`` object."""
    assert message["encoding"] == "base64"
    text = message["text"]
    assert isinstance(text, str)
    return base64.b64decode(text)


def test_flask_example_records_a_json_post(
    collector: Collector, example_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Flask example, configured from the environment, records a JSON POST with its bodies."""
    monkeypatch.setenv("ALF_ENVIRONMENT", "flask-test")
    module = load_example(EXAMPLES / "flask_app" / "app.py", monkeypatch)
    payload = {"name": "kite", "price": 12.5, "tags": ["red"]}

    # buffered=True: like a real server, Werkzeug's client then calls the iterable's close(),
    # which is where the middleware finishes the entry.
    client = module.app.test_client()
    headers = {"X-Api-Key": API_KEY}
    response = client.post("/api/items?source=test", json=payload, headers=headers, buffered=True)

    assert response.status_code == 201
    [entry] = received_entries(collector, 1)
    [stored] = collector.entries()
    assert (stored.service_token, stored.environment) == (TOKEN, "flask-test")
    # identify= names the key's account as the consumer; the key itself is not sent.
    assert stored.consumer == ACCOUNT
    assert header(entry["request"], "x-api-key") == ["[REDACTED]"]
    assert API_KEY not in json.dumps(entry)
    assert entry["request"]["method"] == "POST"
    assert entry["request"]["url"] == "http://localhost/api/items?source=test"
    assert entry["request"]["queryString"] == [{"name": "source", "value": "test"}]
    assert json.loads(decoded(entry["request"]["postData"])) == payload
    assert entry["response"]["status"] == 201
    assert decoded(entry["response"]["content"]) == response.data


def test_starlette_example_flushes_at_lifespan_shutdown(
    collector: Collector, example_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Starlette example delivers a binary upload's entry when its lifespan shuts down."""
    with warnings.catch_warnings():
        # Starlette 1.x nudges towards httpx2 at import (a UserWarning subclass).
        warnings.simplefilter("ignore", UserWarning)
        from starlette.testclient import TestClient

    monkeypatch.setenv("ALF_ENVIRONMENT", "starlette-test")
    # Binary bodies are kept only when their type is listed (the default list is text-like).
    monkeypatch.setenv("ALF_LOG_BODY_TYPES", "application/octet-stream,application/json")
    module = load_example(EXAMPLES / "starlette_app" / "app.py", monkeypatch)
    data = bytes(range(256)) * 8

    with TestClient(module.app) as client:
        headers = {"Content-Type": "application/octet-stream", "X-Api-Key": API_KEY}
        response = client.post("/api/upload", content=data, headers=headers)
        assert response.status_code == 201
        assert client.get("/health", headers={"X-Api-Key": "not-a-key"}).status_code == 200
    # No flush() here: the middleware flushed (and waited) before lifespan.shutdown.complete.
    assert collector.count() == 2

    entry, _ = received_entries(collector, 2)
    upload, health = collector.entries()
    assert upload.environment == "starlette-test"
    assert (upload.consumer, health.consumer) == (ACCOUNT, None)  # an unknown key: nobody
    assert header(entry["request"], "x-api-key") == ["[REDACTED]"]
    assert API_KEY not in json.dumps(entry)
    assert response.json()["sha256"] == hashlib.sha256(data).hexdigest()
    assert entry["request"]["bodySize"] == len(data)
    assert decoded(entry["request"]["postData"]) == data
    assert entry["response"]["status"] == 201


_DJANGO_CLIENT_SCRIPT = textwrap.dedent(
    """
    import asyncio, json, os, sys

    sys.path.insert(0, sys.argv[1])
    os.environ["DJANGO_SETTINGS_MODULE"] = "mysite.settings"
    import django

    django.setup()
    from django.core.files.uploadedfile import SimpleUploadedFile
    from django.test import AsyncClient, Client

    kind, path, key = sys.argv[2], sys.argv[3], sys.argv[4]
    headers = {"X-Api-Key": key}
    if kind == "upload":
        upload = SimpleUploadedFile("hello.txt", b"hello, analytics", "text/plain")
        response = Client().post(path, {"file": upload}, headers=headers)
        body = response.content
    elif kind == "async":
        # Per request: AsyncClient(headers=...) sends its defaults as "Http-..." (Django 5.2).
        response = asyncio.run(AsyncClient().get(path, headers=headers))
        body = response.content
    else:
        response = Client().get(path, headers=headers)
        body = b"".join(response.streaming_content)
    print(json.dumps({"status": response.status_code, "body": body.decode()}))
    """
)


@pytest.mark.parametrize(
    ("kind", "path", "status", "body_marker"),
    [
        pytest.param("upload", "/api/upload", 201, '"filename": "hello.txt"', id="file-upload"),
        pytest.param("async", "/api/search?q=g&tag=blue", 200, '"gadget"', id="async-view"),
        pytest.param("stream", "/api/stream?chunks=3", 200, "line 2: ", id="streaming-view"),
    ],
)
def test_django_example_records_each_kind_of_view(
    collector: Collector,
    example_env: dict[str, str],
    kind: str,
    path: str,
    status: int,
    body_marker: str,
) -> None:
    """The Django example's settings record a file upload, an async view and a streaming view.

    Django's settings are process-wide, so the project runs in its own interpreter; the entry
    is delivered by the middleware's atexit flush when that interpreter exits.
    """
    env = {**os.environ, **example_env, "ALF_ENVIRONMENT": "django-test"}
    # Uploads are kept only when their type is listed (the default list is text-like).
    env["ALF_LOG_BODY_TYPES"] = "multipart/form-data,application/json,text/*"
    result = subprocess.run(
        [sys.executable, "-c", _DJANGO_CLIENT_SCRIPT, str(DJANGO_DIR), kind, path, API_KEY],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout.splitlines()[-1])
    assert answer["status"] == status
    assert body_marker in answer["body"]

    [entry] = received_entries(collector, 1)
    [stored] = collector.entries()
    assert stored.environment == "django-test"
    # mysite/accounts.py names the key's account with set_consumer(), sync and async alike.
    assert stored.consumer == ACCOUNT
    assert header(entry["request"], "x-api-key") == ["[REDACTED]"]
    assert entry["request"]["url"] == f"http://testserver{path}"
    assert entry["response"]["status"] == status
    assert decoded(entry["response"]["content"]).decode() == answer["body"]
    if kind == "upload":
        assert b"hello, analytics" in decoded(entry["request"]["postData"])


def _listening_url(log: Path, process: subprocess.Popen[bytes], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = re.search(r"running on (http://127\.0\.0\.1:\d+)", log.read_text("utf-8"))
        if match:
            return match.group(1)
        assert process.poll() is None, log.read_text("utf-8")
        time.sleep(0.05)
    raise AssertionError(f"uvicorn did not start: {log.read_text('utf-8')}")


@pytest.mark.slow
def test_django_asgi_example_flushes_when_uvicorn_gets_sigterm(
    collector: Collector, example_env: dict[str, str], tmp_path: Path
) -> None:
    """Under uvicorn, whose SIGTERM exit skips atexit, the example's lifespan shim still flushes."""
    log = tmp_path / "uvicorn.log"
    env = {**os.environ, **example_env, "ALF_ENVIRONMENT": "django-asgi-test"}
    env["DJANGO_SETTINGS_MODULE"] = "mysite.settings"  # not whatever another test set
    command = [sys.executable, "-m", "uvicorn", "--host", "127.0.0.1", "--port", "0"]
    command += ["--app-dir", str(DJANGO_DIR), "mysite.asgi:application"]
    with log.open("wb") as output:
        process = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT)
    try:
        url = _listening_url(log, process, timeout=30)
        statuses = [httpx.get(f"{url}{path}", timeout=10).status_code for path in ("/health", "/x")]
        assert statuses == [200, 404]
        process.send_signal(signal.SIGTERM)
        process.wait(30)
    finally:
        process.kill()
        process.wait(10)

    # The entries are younger than the batching delay: only the shutdown flush can have sent them.
    assert collector.count() == 2, log.read_text("utf-8")
    entries = received_entries(collector, 2)
    assert sorted(e["response"]["status"] for e in entries) == [200, 404]


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    """`make demo` (examples/demo.py) exits 0, every framework's entries all arrived, and
    without a terminal it prints the dashboard's address and stops at once."""
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "demo.py"), "--workdir", str(tmp_path / "demo")],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,  # not the terminal pytest may run in: the demo would wait
        capture_output=True,
        text=True,
        timeout=150,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    rows = re.findall(r"^(\S+-demo) +(?:GET|POST|PUT|DELETE) +/", output, re.MULTILINE)
    table_environments = set(rows)
    assert table_environments == set(DEMO_ENVIRONMENTS), output
    verdicts = re.findall(r"(\S+) +sent (\d+) requests, collector holds (\d+) entries: OK", output)
    assert {name for name, _, _ in verdicts} == {"flask", "starlette", "django", "django-asgi"}
    assert all(sent == held and int(sent) > 200 for _, sent, held in verdicts), verdicts
    # Most requests carry an account's API key: every app's entries name its consumers.
    consumers = re.findall(r"(\S+) +consumers (.+): OK$", output, re.MULTILINE)
    assert {name for name, _ in consumers} == {"flask", "starlette", "django", "django-asgi"}
    for name, listed in consumers:
        counts = dict(part.rsplit(" ", 1) for part in listed.split(", "))
        assert set(counts) == DEMO_ACCOUNTS, (name, listed)
        assert sum(map(int, counts.values())) > 150, (name, listed)
    assert re.search(r"dashboard: http://127\.0\.0\.1:\d+/\n.*read key: +\S{20,}", output)
    assert "no terminal: stopping the collector" in output


class _Lines:
    """The lines a child process prints, read in a thread so a test can wait for one."""

    def __init__(self, stream: IO[str]) -> None:
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self.lines.put(line)

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                continue
            self.seen.append(line)
            match = re.search(pattern, line)
            if match:
                return match
        raise AssertionError(f"no line matching {pattern!r} in:\n{''.join(self.seen)}")


@pytest.mark.slow
def test_demo_in_a_terminal_serves_the_dashboard_until_ctrl_c(tmp_path: Path) -> None:
    """From a terminal, the demo keeps the collector up with its dashboard behind the printed
    read key, showing the demo's traffic, until Ctrl-C stops both."""
    primary, secondary = pty.openpty()
    command = [sys.executable, str(EXAMPLES / "demo.py"), "--requests", "40"]
    process = subprocess.Popen(
        [*command, "--workdir", str(tmp_path / "demo")],
        cwd=ROOT,
        stdin=secondary,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    os.close(secondary)
    try:
        assert process.stdout is not None
        output = _Lines(process.stdout)
        sent = sum(
            int(match.group(1))
            for match in (
                output.wait_for(r"sent (\d+) requests, collector holds \1 entries: OK", 120)
                for _ in DEMO_ENVIRONMENTS
            )
        )
        url = output.wait_for(r"dashboard: (http://127\.0\.0\.1:\d+)/", 10).group(1)
        key = output.wait_for(r"read key: +(\S+)", 10).group(1)
        output.wait_for(r"Ctrl-C stops the collector", 10)

        with httpx.Client(base_url=url, timeout=10) as browser:
            assert browser.get("/").status_code == 303  # to the login page: no data
            assert browser.post("/login", data={"key": key}).status_code == 303
            page = browser.get("/", params={"service": "demo"})
            assert page.status_code == 200
            assert f'data-figure="count">{sent:,}<' in page.text
            for environment in DEMO_ENVIRONMENTS:
                assert f">{environment}</option>" in page.text
            # The Consumers panel lists the demo's accounts, and the log filters by one.
            panel = page.text.split("<h2>Consumers</h2>", 1)[1].split("</table>", 1)[0]
            assert set(re.findall(r'consumer=[^"]*"[^>]*>([^<]+)</a>', panel)) == DEMO_ACCOUNTS
            log = browser.get("/requests", params={"service": "demo", "consumer": "hooli"})
            assert log.status_code == 200 and "data-entry-id=" in log.text
            assert set(re.findall(r'consumer=[^"]*"[^>]*>([^<]+)</a></td>', log.text)) == {"hooli"}
        stats = httpx.get(f"{url}/api/stats", headers={"Authorization": f"Bearer {key}"})
        assert stats.json()["count"] == sent

        process.send_signal(signal.SIGINT)
        assert process.wait(30) == 0
        output.wait_for(r"Ctrl-C: stopping the collector", 10)
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/health", timeout=5)
    finally:
        process.kill()
        process.wait(10)
        os.close(primary)
