"""The app a real server loads: one variant, chosen by environment variables.

uvicorn (``server_app:app`` with BENCH_FRAMEWORK=starlette) and gunicorn (with
BENCH_FRAMEWORK=flask) import this module; BENCH_VARIANT names the variant and BENCH_SINK
the loopback sink it sends to.  Bodies are off: the server scenario is the GET.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from apps import make_app
from variants import build

_framework = os.environ["BENCH_FRAMEWORK"]
_wrapped = build(
    os.environ["BENCH_VARIANT"], _framework, make_app(_framework), os.environ["BENCH_SINK"], False
)
app = _wrapped.app
