"""An asgi.py that only mentions FlushOnShutdown (W003 must still fire); never imported.

# TODO: application = FlushOnShutdown(get_asgi_application())
"""

from __future__ import annotations

from django.core.asgi import get_asgi_application

NOTE = "wrap with FlushOnShutdown(...) later"
application = get_asgi_application()  # FlushOnShutdown(application) is missing
