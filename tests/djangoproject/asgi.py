"""ASGI entry point for uvicorn: ``uvicorn tests.djangoproject.asgi:application``."""

from __future__ import annotations

import os

from django.core.asgi import get_asgi_application

from alf_analytics.asgi import FlushOnShutdown

os.environ.setdefault("DJANGO_SETTINGS_MODULE", f"{__name__.rpartition('.')[0]}.settings")
# Django refuses the lifespan scope and uvicorn's SIGTERM exit skips atexit: flush here.
application = FlushOnShutdown(get_asgi_application())
