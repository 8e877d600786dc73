"""The public surface: what ``import alf_analytics`` offers, and nothing framework-specific."""

from __future__ import annotations

import subprocess
import sys
import types

import alf_analytics


def test_all_lists_the_public_names() -> None:
    public = {
        name
        for name, value in vars(alf_analytics).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    public.discard("annotations")  # from __future__
    assert set(alf_analytics.__all__) == public | {"__version__"}


def test_importing_the_package_imports_no_framework() -> None:
    code = (
        "import sys, alf_analytics, alf_analytics.wsgi, alf_analytics.asgi\n"
        "loaded = [m for m in ('django', 'flask', 'starlette', 'werkzeug', 'fastapi') "
        "if m in sys.modules]\n"
        "print(','.join(loaded))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_importing_the_package_leaves_the_root_logger_alone() -> None:
    code = (
        "import logging\n"
        "root = logging.getLogger()\n"
        "before = (root.level, list(root.handlers))\n"
        "import alf_analytics\n"
        "alf_analytics.AnalyticsWSGIMiddleware(lambda e, s: [], service_token='t' * 12)\n"
        "assert (root.level, list(root.handlers)) == before, (root.level, root.handlers)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
