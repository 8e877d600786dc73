"""Django system checks: ``manage.py check`` reports our misconfigurations the Django way."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.core import checks
from django.core.management import call_command
from django.test import AsyncClient, override_settings

import alf_analytics
from alf_analytics import _signals
from alf_analytics._config import ENV_VARS
from alf_analytics.asgi import FlushOnShutdown
from alf_analytics.collector import Collector

from .djangoproject import project_settings, setup

setup()

OURS = "alf_analytics.django.AnalyticsMiddleware"
TOKEN = "checks-secret-token-0123456789"
TESTS = Path(__file__).parent


@pytest.fixture(autouse=True)
def _project(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for variable in ENV_VARS.values():
        monkeypatch.delenv(variable, raising=False)
    with override_settings(**project_settings()):
        yield


def ours(**settings: Any) -> list[checks.CheckMessage]:
    """Our messages (tag alf_analytics) under the given settings."""
    with override_settings(**settings):
        return [
            m for m in checks.run_checks(tags=["alf_analytics"]) if m.id and m.id.startswith("alf")
        ]


def ids(messages: list[checks.CheckMessage]) -> list[str]:
    return sorted(str(m.id) for m in messages)


def test_the_test_project_passes_every_check() -> None:
    assert ours() == []


def test_checks_are_registered_by_the_app() -> None:
    assert "alf_analytics" in checks.registry.registry.tags_available()


def test_not_a_dict_is_e001() -> None:
    (message,) = ours(ALF_ANALYTICS=["service_token", TOKEN])
    assert message.id == "alf_analytics.E001" and message.level == checks.ERROR
    assert "settings.ALF_ANALYTICS must be a dict" in message.msg
    assert TOKEN not in message.msg


def test_unknown_keys_are_e002_with_the_closest_name() -> None:
    messages = ours(ALF_ANALYTICS={"service_token": TOKEN, "batchsize": 5, "zzz": 1})
    assert ids(messages) == ["alf_analytics.E002", "alf_analytics.E002"]
    by_key = {m.msg: m for m in messages}
    batch = by_key['settings.ALF_ANALYTICS["batchsize"] is not an alf_analytics option.']
    assert batch.hint == 'Did you mean "batch_size"?'


def test_bad_values_are_e003_in_django_terms() -> None:
    messages = ours(
        ALF_ANALYTICS={"service_token": TOKEN, "batch_size": 0, "sample_rate": 3, "delay": "x"}
    )
    assert ids(messages) == ["alf_analytics.E003"] * 3
    texts = " | ".join(m.msg for m in messages)
    assert 'settings.ALF_ANALYTICS["batch_size"]=0 is invalid: must be >= 1' in texts
    assert 'settings.ALF_ANALYTICS["sample_rate"]=3 is invalid' in texts
    assert 'settings.ALF_ANALYTICS["delay"] must be a number of seconds' in texts
    assert all(m.obj.startswith('settings.ALF_ANALYTICS["') for m in messages)


def test_missing_token_is_e004_with_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    (message,) = ours(ALF_ANALYTICS={"environment": "prod"})
    assert message.id == "alf_analytics.E004"
    assert "ALF_SERVICE_TOKEN" in message.hint and '["require_token"] = False' in message.hint
    monkeypatch.setenv("ALF_SERVICE_TOKEN", TOKEN)
    assert ours(ALF_ANALYTICS={"environment": "prod"}) == []
    monkeypatch.delenv("ALF_SERVICE_TOKEN")
    assert ours(ALF_ANALYTICS={"require_token": False}) == []


def test_options_that_do_not_fit_together_are_e005(monkeypatch: pytest.MonkeyPatch) -> None:
    (message,) = ours(
        ALF_ANALYTICS={"service_token": TOKEN, "log_body": True, "max_body_bytes": 900_000}
    )
    assert message.id == "alf_analytics.E005" and "max_batch_bytes" in message.msg
    monkeypatch.setenv("ALF_BATCH_SIZE", "lots")
    (message,) = ours(ALF_ANALYTICS={"service_token": TOKEN})
    assert message.id == "alf_analytics.E005" and "ALF_BATCH_SIZE='lots'" in message.msg


def test_misspelled_setting_is_w002() -> None:
    with override_settings(ALF_ANALYTIC={"service_token": TOKEN}):
        from django.conf import settings

        del settings.ALF_ANALYTICS
        messages = [m for m in checks.run_checks(tags=["alf_analytics"])]
    assert "alf_analytics.W002" in ids(messages)
    w002 = next(m for m in messages if m.id == "alf_analytics.W002")
    assert "settings.ALF_ANALYTIC is not read" in w002.msg
    assert "alf_analytics.E004" in ids(messages)  # and so no token


def test_middleware_not_first_is_w001() -> None:
    (message,) = ours(MIDDLEWARE=["django.middleware.common.CommonMiddleware", OURS])
    assert message.id == "alf_analytics.W001" and message.level == checks.WARNING
    assert "not first in MIDDLEWARE" in message.msg and "Move" in message.hint


def test_middleware_missing_is_w004_and_misspelled_is_e006() -> None:
    assert ids(ours(MIDDLEWARE=["django.middleware.common.CommonMiddleware"])) == [
        "alf_analytics.W004"
    ]
    (message,) = ours(MIDDLEWARE=["alf_analytics.django.AnalyticMiddleware"])
    assert message.id == "alf_analytics.E006" and OURS in message.hint


def test_asgi_module_without_flush_on_shutdown_is_w003() -> None:
    # tests/djangoproject/asgi.py wraps its application; this module does not.
    (message,) = ours(ASGI_APPLICATION="tests.djangoproject.controls.application")
    assert message.id == "alf_analytics.W003"
    assert "FlushOnShutdown(get_asgi_application())" in message.hint
    assert ours(ASGI_APPLICATION="tests.djangoproject.asgi.application") == []
    # Named in a comment, a docstring and a string only: still not wrapped.
    (message,) = ours(ASGI_APPLICATION="tests.djangoproject.asgi_unwrapped.application")
    assert message.id == "alf_analytics.W003"


def test_manage_py_check_reports_them() -> None:
    """The real command: ``check`` fails on our errors and prints the ids and hints."""
    with override_settings(ALF_ANALYTICS={"service_token": TOKEN, "batch_size": 0}):
        err = io.StringIO()
        with pytest.raises(Exception, match="SystemCheckError|System check identified"):
            call_command("check", stderr=err, stdout=io.StringIO())


@pytest.mark.slow
def test_manage_py_check_in_a_fresh_process() -> None:
    """As a user runs it: a fresh interpreter, settings from DJANGO_SETTINGS_MODULE."""
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.djangoproject.settings",
        "ALF_BATCH_SIZE": "0",
    }
    code = "from django.core.management import execute_from_command_line as x; x(['m', 'check'])"
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=TESTS.parent, env=env, capture_output=True, text=True
    )
    assert done.returncode == 1, done.stderr
    assert "alf_analytics.E005" in done.stderr and "ALF_BATCH_SIZE='0'" in done.stderr


# -- FlushOnShutdown and the warning without it --------------------------------------------------


def test_flush_on_shutdown_takes_shutdown_timeout_from_the_setting() -> None:
    wrapper = FlushOnShutdown(lambda *args: None)  # type: ignore[arg-type, return-value]
    with override_settings(ALF_ANALYTICS={"service_token": TOKEN, "shutdown_timeout": 1.25}):
        assert wrapper.timeout == 1.25
    with override_settings(ALF_ANALYTICS={"service_token": TOKEN}):
        assert wrapper.timeout == 5.0
    explicit = FlushOnShutdown(lambda *args: None, timeout=0.5)  # type: ignore[arg-type, return-value]
    assert explicit.timeout == 0.5


def test_django_under_asgi_without_the_wrapper_warns_once_with_the_fix(
    collector: Collector, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_signals, "_warned", False)
    monkeypatch.setattr(_signals, "flush_wrapper_seen", False)
    options = {"service_token": TOKEN, "collector_url": collector.url}
    with override_settings(ALF_ANALYTICS=options), caplog.at_level(logging.WARNING):
        client = AsyncClient()
        from asgiref.sync import async_to_sync

        for _ in range(3):
            async_to_sync(client.get)("/sync")
    lines = [r.getMessage() for r in caplog.records if "FlushOnShutdown" in r.getMessage()]
    assert len(lines) == 1
    assert "application = FlushOnShutdown(get_asgi_application())" in lines[0]
    assert alf_analytics.flush(5.0)
