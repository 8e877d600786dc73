"""ASGI entry point.

    uvicorn --app-dir examples/django_app mysite.asgi:application

Django does not speak the ASGI lifespan protocol, and uvicorn (0.29 and newer) ends its
graceful SIGTERM shutdown by re-raising SIGTERM, so the process dies without running
``atexit`` hooks: the entries still queued would be lost. ``application`` therefore answers the
lifespan protocol itself and flushes alf-analytics on shutdown, off the event loop.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from django.core.asgi import get_asgi_application

import alf_analytics

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mysite.settings")
django_application = get_asgi_application()


async def application(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "lifespan":
        await django_application(scope, receive, send)
        return
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await asyncio.to_thread(alf_analytics.flush, 5.0)
            await send({"type": "lifespan.shutdown.complete"})
            return
