"""A minimal Django project for the Django middleware tests (no database, no templates).

In-process tests call :func:`setup`; real servers load ``wsgi.py``/``asgi.py`` with
``DJANGO_SETTINGS_MODULE`` pointing at ``settings.py`` of this package.
"""

from __future__ import annotations

from importlib import import_module


def setup() -> None:
    """Configure Django from this package's settings without touching ``os.environ``."""
    import django
    from django.conf import settings

    if not settings.configured:
        module = import_module(f"{__name__}.settings")
        settings.configure(
            **{name: getattr(module, name) for name in dir(module) if name.isupper()}
        )
    django.setup(set_prefix=False)


def project_settings() -> dict[str, object]:
    """The settings each test overrides, so tests work whoever configured Django first."""
    module = import_module(f"{__name__}.settings")
    names = ("ALLOWED_HOSTS", "DEBUG", "MIDDLEWARE", "ROOT_URLCONF", "ALF_ANALYTICS")
    return {name: getattr(module, name) for name in names}
