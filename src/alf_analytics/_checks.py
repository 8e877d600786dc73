"""Django system checks (``manage.py check``, ``runserver``, ``migrate`` run them).

Registered when Django loads the ``alf_analytics`` app (``INSTALLED_APPS``) or imports the
middleware. Messages use Django's terms (``settings.ALF_ANALYTICS["batch_size"]``):

- ``alf_analytics.E001``: ``settings.ALF_ANALYTICS`` is not a dict.
- ``alf_analytics.E002``: an unknown key in ``settings.ALF_ANALYTICS`` (with the closest name).
- ``alf_analytics.E003``: a bad value for a key.
- ``alf_analytics.E004``: no service token (neither the key nor ``ALF_SERVICE_TOKEN``) while
  ``require_token`` is on: the middleware would refuse to start.
- ``alf_analytics.E005``: the options do not work together, or an ``ALF_*`` variable is bad.
- ``alf_analytics.E006``: ``MIDDLEWARE`` names a misspelled alf_analytics middleware.
- ``alf_analytics.W001``: the middleware is not first in ``MIDDLEWARE``.
- ``alf_analytics.W002``: a setting that looks like a misspelled ``ALF_ANALYTICS``.
- ``alf_analytics.W003``: the project's ``asgi.py`` does not wrap the application in
  ``FlushOnShutdown`` (entries queued when an ASGI server stops would be lost).
- ``alf_analytics.W004``: ``alf_analytics`` is installed but its middleware is not in
  ``MIDDLEWARE``: nothing is recorded.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import os
import re
from collections.abc import Sequence
from typing import Any

from django.conf import settings
from django.core import checks

from ._config import ENV_VARS, OPTION_NAMES, make_config, validate_option

MIDDLEWARE_PATH = "alf_analytics.django.AnalyticsMiddleware"
SETTING = "ALF_ANALYTICS"
_ID = "alf_analytics."


def register() -> None:
    """Register the checks once (Django's registry is a set)."""
    checks.register(check_settings, "alf_analytics")
    checks.register(check_middleware, "alf_analytics")
    checks.register(check_asgi_wrapper, "alf_analytics")


def _key(name: str) -> str:
    return f'settings.ALF_ANALYTICS["{name}"]'


def django_terms(message: str) -> str:
    """A config error in Django's terms: ``settings.ALF_ANALYTICS["batch_size"]=0 ...``."""
    message = message.removeprefix("alf_analytics: ")
    # "the environment variable for option x" stays: that one is about ALF_X, not the setting.
    message = re.sub(
        r"(?<!variable for )\boption ([a-z_]+)", r'settings.ALF_ANALYTICS["\1"]', message
    )
    return message.replace("unknown option(s)", "unknown key(s) in settings.ALF_ANALYTICS:")


def _middleware() -> list[str]:
    return [str(entry) for entry in getattr(settings, "MIDDLEWARE", None) or ()]


def check_settings(app_configs: Sequence[Any] | None = None, **kwargs: Any) -> list[Any]:
    errors: list[Any] = []
    installed = MIDDLEWARE_PATH in _middleware()
    if not hasattr(settings, SETTING):
        similar = [
            name
            for name in dir(settings)
            if name.isupper() and name != SETTING and _looks_like_ours(name)
        ]
        for name in similar:
            errors.append(
                checks.Warning(
                    f"settings.{name} is not read by alf_analytics; did you mean "
                    "settings.ALF_ANALYTICS?",
                    hint=f"Rename settings.{name} to settings.ALF_ANALYTICS.",
                    obj=f"settings.{name}",
                    id=_ID + "W002",
                )
            )
    options = getattr(settings, SETTING, None)
    if options is None:
        options = {}
    if not isinstance(options, dict):
        return [
            *errors,
            checks.Error(
                f"settings.ALF_ANALYTICS must be a dict of options, got {type(options).__name__}.",
                hint='For example ALF_ANALYTICS = {"service_token": "...", "environment": "prod"}',
                obj="settings.ALF_ANALYTICS",
                id=_ID + "E001",
            ),
        ]
    bad_keys = False
    for name in sorted(set(options) - OPTION_NAMES, key=str):
        bad_keys = True
        close = difflib.get_close_matches(str(name), sorted(OPTION_NAMES), n=1)
        errors.append(
            checks.Error(
                f"{_key(str(name))} is not an alf_analytics option.",
                hint=f'Did you mean "{close[0]}"?' if close else "See the README's options table.",
                obj="settings.ALF_ANALYTICS",
                id=_ID + "E002",
            )
        )
    for name in sorted(OPTION_NAMES & set(options)):
        value = options[name]
        if value is None:
            continue
        try:
            validate_option(name, value)
        except (TypeError, ValueError) as exc:
            bad_keys = True
            errors.append(
                checks.Error(
                    django_terms(str(exc)),
                    hint=None,
                    obj=_key(name),
                    id=_ID + "E003",
                )
            )
    if bad_keys:
        return errors
    token_given = options.get("service_token") is not None or ENV_VARS["service_token"] in (
        os.environ
    )
    try:
        make_config(options)
    except (TypeError, ValueError) as exc:
        if not token_given and "service_token is required" in str(exc):
            if installed:
                errors.append(
                    checks.Error(
                        "alf_analytics has no service token: the middleware would refuse to start.",
                        hint=f"Set {_key('service_token')} or the ALF_SERVICE_TOKEN environment "
                        f"variable; or {_key('require_token')} = False to run without "
                        "recording (development, tests).",
                        obj="settings.ALF_ANALYTICS",
                        id=_ID + "E004",
                    )
                )
        else:
            errors.append(
                checks.Error(django_terms(str(exc)), obj="settings.ALF_ANALYTICS", id=_ID + "E005")
            )
    return errors


def _looks_like_ours(name: str) -> bool:
    lowered = name.lower()
    if lowered.startswith("alf"):
        return True
    return difflib.SequenceMatcher(None, lowered, SETTING.lower()).ratio() >= 0.8


def check_middleware(app_configs: Sequence[Any] | None = None, **kwargs: Any) -> list[Any]:
    middleware = _middleware()
    if MIDDLEWARE_PATH not in middleware:
        misspelled = [
            entry
            for entry in middleware
            if "alf" in entry.lower() or entry.lower().endswith("analyticsmiddleware")
        ]
        if misspelled:
            return [
                checks.Error(
                    f"MIDDLEWARE has {misspelled[0]!r}, which is not alf_analytics' middleware.",
                    hint=f'Use "{MIDDLEWARE_PATH}".',
                    obj="settings.MIDDLEWARE",
                    id=_ID + "E006",
                )
            ]
        return [
            checks.Warning(
                "alf_analytics is installed but its middleware is not in MIDDLEWARE: no request "
                "is recorded.",
                hint=f'Put "{MIDDLEWARE_PATH}" first in MIDDLEWARE.',
                obj="settings.MIDDLEWARE",
                id=_ID + "W004",
            )
        ]
    if middleware[0] != MIDDLEWARE_PATH:
        return [
            checks.Warning(
                f"{MIDDLEWARE_PATH} is not first in MIDDLEWARE (it is at position "
                f"{middleware.index(MIDDLEWARE_PATH)}, after {middleware[0]!r}): responses "
                "and errors of the middleware before it, and their time, are not recorded.",
                hint=f'Move "{MIDDLEWARE_PATH}" to the top of MIDDLEWARE.',
                obj="settings.MIDDLEWARE",
                id=_ID + "W001",
            )
        ]
    return []


def _asgi_module() -> str | None:
    """The module of the project's ASGI application, from the settings Django projects have."""
    asgi = getattr(settings, "ASGI_APPLICATION", None)
    if isinstance(asgi, str) and "." in asgi:
        return asgi.rpartition(".")[0]
    wsgi = getattr(settings, "WSGI_APPLICATION", None)
    if isinstance(wsgi, str) and wsgi.count(".") >= 2:
        package = wsgi.rpartition(".")[0].rpartition(".")[0]
        return f"{package}.asgi"
    return None


def check_asgi_wrapper(app_configs: Sequence[Any] | None = None, **kwargs: Any) -> list[Any]:
    if MIDDLEWARE_PATH not in _middleware():
        return []
    module = _asgi_module()
    if module is None:
        return []
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return []
    if spec is None or not spec.origin or not os.path.isfile(spec.origin):
        return []
    try:
        with open(spec.origin, encoding="utf-8", errors="replace") as source:
            wrapped = _calls_flush_on_shutdown(source.read())
    except OSError:
        return []
    if wrapped is not False:  # wrapped, or a file we cannot parse: nothing to say
        return []
    return [
        checks.Warning(
            f"{module} does not wrap the application in FlushOnShutdown: under an ASGI server "
            "(uvicorn, daphne, hypercorn) the entries still queued when it stops are lost.",
            hint="In asgi.py: from alf_analytics.asgi import FlushOnShutdown; application = "
            "FlushOnShutdown(get_asgi_application()). Silence alf_analytics.W003 if you "
            "serve with WSGI only.",
            obj=module,
            id=_ID + "W003",
        )
    ]


def _calls_flush_on_shutdown(source: str) -> bool | None:
    """Whether the module's code calls ``FlushOnShutdown(...)`` (not only names it in a
    comment or a string); None when it does not parse. Read, never imported: importing
    ``asgi.py`` would build the application."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return None
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
            if name == "FlushOnShutdown":
                return True
    return False
