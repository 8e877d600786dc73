"""Settings of the test project: our middleware first, no database, no logging setup.

``ALF_ANALYTICS`` has no ``collector_url``: real servers get it from ``ALF_COLLECTOR_URL`` and
in-process tests override the whole dict with the test collector's URL.
"""

from __future__ import annotations

import os

_PACKAGE = __name__.rpartition(".")[0]

SECRET_KEY = "alf-analytics-tests-not-secret"
DEBUG = False
ALLOWED_HOSTS = ["*"]
# alf_analytics as an app: its system checks run with the project's.
INSTALLED_APPS: list[str] = ["alf_analytics"]
MIDDLEWARE = ["alf_analytics.django.AnalyticsMiddleware"]
ROOT_URLCONF = f"{_PACKAGE}.urls"
WSGI_APPLICATION = f"{_PACKAGE}.wsgi.application"
DATABASES: dict[str, dict[str, str]] = {}
USE_TZ = True
# Leave the test process's logging (and warnings capture) alone.
LOGGING_CONFIG = None
ALF_ANALYTICS = {
    "service_token": "django-project-token",
    "environment": "django-project",
    "log_body": True,
    # Every body, so the tests see byte-faithful captures; the allow-list has its own tests.
    "log_body_types": ["*/*", "text/event-stream"],
    # Real-server tests see entries through the flush at exit (SIGTERM) unless they lower this.
    "delay": float(os.environ.get("DJANGOPROJECT_ALF_DELAY", "60")),
}
