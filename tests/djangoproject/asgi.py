"""ASGI entry point for uvicorn: ``uvicorn tests.djangoproject.asgi:application``."""

from __future__ import annotations

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", f"{__name__.rpartition('.')[0]}.settings")
application = get_asgi_application()
