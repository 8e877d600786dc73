"""The per-request decisions every adapter takes the same way, before anything is captured.

In order, cheapest first: ``skip_methods``, ``skip_paths``, ``skip(request)``,
``sample_rate``, then a per-request ``service_token``/``environment`` (``None`` skips). A
request turned away here builds no :class:`~alf_analytics._record.Exchange`; it is only
counted (``stats()["skipped"]`` / ``["sampled_out"]``). After the response, ``identify``
names the consumer unless the app called :func:`alf_analytics.set_consumer`.

The callables the user gives receive the framework's request object, made by the adapter's
``request_of`` only when a callable needs it. Their exceptions never reach the app: each is
logged once per callable, and the request is then recorded (``skip``), left without a
consumer (``identify``) or skipped (``service_token``).
"""

from __future__ import annotations

import functools
import inspect
import logging
import random
import sys
import traceback
from collections.abc import Callable
from typing import Any

from . import _worker
from ._config import Config

logger = logging.getLogger("alf_analytics")

#: ``(service_token, environment)``: what the worker batches by.
Group = tuple[str, str | None]


def _uncounted(config: Config) -> None:  # pragma: no cover - the worker provides both
    return None


def _counter(name: str) -> Callable[[Config], None]:
    count: Callable[[Config], None] = getattr(_worker, name, _uncounted)
    return count


class Gate:
    """Decides, for one middleware, whether and under which group a request is recorded."""

    __slots__ = (
        "config",
        "simple",
        "_method_of",
        "_path_of",
        "_request_of",
        "_failed",
        "_random",
    )

    def __init__(
        self,
        config: Config,
        *,
        method_of: Callable[[Any], str],
        path_of: Callable[[Any], str],
        request_of: Callable[[Any], Any],
    ) -> None:
        self.config = config
        #: Nothing to decide per request: every request is recorded under ``config.group``.
        self.simple = not (
            config.has_skip_rules
            or config.sample_rate < 1.0
            or callable(config.service_token)
            or callable(config.environment)
        )
        self._method_of = method_of
        self._path_of = path_of
        self._request_of = request_of
        self._failed: set[str] = set()
        # The module's generator: Python reseeds it in a forked child (gunicorn --preload),
        # so workers forked from one middleware do not all draw the same samples.
        self._random = random.random

    def admit(self, native: Any) -> tuple[Group, Any] | None:
        """``(group, request object or None)`` for a request to record, ``None`` otherwise.

        ``native`` is what the adapter has: the WSGI environ, the ASGI scope, Django's request.
        """
        config = self.config
        request = None
        if config.skip_methods and self._method_of(native).upper() in config.skip_methods:
            self._skip()
            return None
        if config.skip_paths and config.skips_path(self._path_of(native)):
            self._skip()
            return None
        if config.skip is not None:
            request = self._request_of(native)
            if self._call("skip", config.skip, request, False):
                self._skip()
                return None
        if config.sample_rate < 1.0 and self._random() >= config.sample_rate:
            _counter("count_sampled_out")(config)
            return None
        token = config.service_token
        if callable(token):
            if request is None:
                request = self._request_of(native)
            token = self._text("service_token", self._call("service_token", token, request, None))
            if token is None:
                self._skip()
                return None
        environment = config.environment
        if callable(environment):
            if request is None:
                request = self._request_of(native)
            environment = self._text(
                "environment", self._call("environment", environment, request, None)
            )
        assert token is not None  # an inactive config never reaches a gate
        return (token, environment), request

    def identify(self, request: Any) -> str | None:
        """The consumer id from ``identify`` (``None`` when unset, failing, or not a str)."""
        identify = self.config.identify
        if identify is None:
            return None
        consumer = self._call("identify", identify, request, None)
        if consumer is None:
            return None
        if not isinstance(consumer, str):
            self._complain("identify", f"returned {type(consumer).__name__}, not a str or None")
            return None
        return consumer or None

    def _text(self, name: str, value: Any) -> str | None:
        """A per-request token or environment, stripped as a static one is; blank is none."""
        if value is None:
            return None
        if not isinstance(value, str):
            self._complain(name, f"returned {type(value).__name__}, not a str or None")
            return None
        return value.strip() or None

    def _skip(self) -> None:
        _counter("count_skipped")(self.config)

    def _call(self, name: str, function: Callable[[Any], Any], request: Any, fallback: Any) -> Any:
        try:
            return function(request)
        except Exception as exc:
            # The exception's type and where it was raised, not its message: the message may
            # quote the request (a header value, a token), and no request secret is logged.
            where = traceback.extract_tb(exc.__traceback__)[-1:]
            place = f" at {where[0].filename}:{where[0].lineno}" if where else ""
            self._complain(name, f"raised {type(exc).__name__}{place}")
            return fallback

    def _complain(self, name: str, what: str) -> None:
        if name in self._failed:
            return
        self._failed.add(name)
        logger.warning(
            "alf_analytics: the %s option's callable %s (logged once; the app is not affected)",
            name,
            what,
        )


def made_with(app: Any, packages: tuple[str, ...]) -> bool:
    """Whether ``app`` (or an app it wraps, through ``.app``) comes from one of ``packages``.

    Tells a Flask or Starlette app (whose callables get the framework's request object) from
    a plain WSGI/ASGI callable (whose callables get the environ or scope). Follows bound
    methods (``flask_app.wsgi_app``) and middleware that keep the wrapped app in ``.app``
    (Werkzeug's ProxyFix, Starlette's middleware stack), at most 16 levels deep.
    """
    target = app
    for _ in range(16):
        if target is None:
            return False
        owner = getattr(target, "__self__", None)
        if owner is not None and not isinstance(owner, type):
            target = owner
        for klass in type(target).__mro__:
            if klass.__module__.partition(".")[0] in packages:
                return True
        target = getattr(target, "app", None)
    return False


def is_async_callable(app: Any) -> bool:
    while isinstance(app, functools.partial):
        app = app.func
    if inspect.iscoroutinefunction(app) or inspect.iscoroutinefunction(
        getattr(app, "__call__", None)  # noqa: B004 - an app object's own method
    ):
        return True
    # asgiref's markcoroutinefunction (Django's async middleware and handlers) sets a mark
    # that inspect reads only from Python 3.12; asgiref's own check reads it on every version.
    asgiref = sys.modules.get("asgiref.sync")
    return asgiref is not None and bool(asgiref.iscoroutinefunction(app))


def takes_two_arguments(app: Any) -> bool:
    """A callable that takes ``(environ, start_response)`` and cannot take three arguments."""
    try:
        signature = inspect.signature(app)
    except (TypeError, ValueError):
        return False
    try:
        signature.bind(None, None, None)
        return False
    except TypeError:
        pass
    try:
        signature.bind(None, None)
        return True
    except TypeError:
        return False
