"""ASGI entry point.

    uvicorn --app-dir examples/django_app mysite.asgi:application

Django does not speak the ASGI lifespan protocol, and uvicorn (0.29 and newer) ends its
graceful SIGTERM shutdown by re-raising SIGTERM, so the process dies without running
``atexit`` hooks. ``FlushOnShutdown`` answers the lifespan protocol for Django and flushes the
entries still queued, off the event loop, before the server exits.
"""

from __future__ import annotations

import os

from django.core.asgi import get_asgi_application

from alf_analytics.asgi import FlushOnShutdown

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mysite.settings")
application = FlushOnShutdown(get_asgi_application())
