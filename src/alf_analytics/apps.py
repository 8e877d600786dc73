"""The Django app ``alf_analytics``: list it in ``INSTALLED_APPS`` for its system checks."""

from __future__ import annotations

from django.apps import AppConfig


class AlfAnalyticsConfig(AppConfig):
    name = "alf_analytics"
    label = "alf_analytics"
    verbose_name = "alf-analytics"

    def ready(self) -> None:
        from . import _checks

        _checks.register()
