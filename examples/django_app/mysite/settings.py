"""Settings of a minimal Django API project recorded by alf-analytics.

No database, no templates, no sessions: just the views in ``mysite/views.py``.
"""

from __future__ import annotations

import os

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "insecure-example-key-do-not-use-in-production")
DEBUG = os.environ.get("DJANGO_DEBUG", "") == "1"
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "[::1]", "testserver"]

INSTALLED_APPS: list[str] = []
MIDDLEWARE = [
    # First, so that it sees every request and every response, errors from later middleware
    # included. (This API has no sessions or forms, hence no CSRF middleware.)
    "alf_analytics.django.AnalyticsMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "django.middleware.common.CommonMiddleware",
    # Names the caller (alf_analytics.set_consumer) from its API key: see mysite/accounts.py.
    "mysite.accounts.api_key_account",
]
ALF_ANALYTICS = {
    "service_token": os.environ.get("ALF_SERVICE_TOKEN", "demo-token"),
    "environment": os.environ.get("ALF_ENVIRONMENT", "django-example"),
    "collector_url": os.environ.get("ALF_COLLECTOR_URL", "http://127.0.0.1:8700"),
    "log_body": True,
}

ROOT_URLCONF = "mysite.urls"
WSGI_APPLICATION = "mysite.wsgi.application"
DATABASES: dict[str, dict[str, str]] = {}
USE_TZ = True
