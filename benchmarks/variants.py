"""The variants: the bare app, ours, and each peer, all pointed at the loopback sink.

One builder per variant takes a fresh app (Starlette or Flask), the sink's URL and whether
bodies are to be captured, and returns the callable to drive (ASGI app or WSGI callable)
plus a ``flush`` that asks the variant to push out what it has queued, using the peer's
own mechanism where it has one.  Peers are configured as documented, with only what a
benchmark needs changed: their endpoint (so that they really send, to loopback), their
body capture (on for the bodies-on scenarios, where they have the option) and a batch size
where the default would make delivery take minutes; ``config`` says exactly what was set.

A builder raises ``Unavailable`` when its package cannot be imported, so the run reports
"n/a (reason)" for that variant instead of failing.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from common import (
    API_ANALYTICS_KEY,
    APITALLY_WRITE_TOKEN,
    MOESIF_APPLICATION_ID,
    README_API_KEY,
    SERVICE_TOKEN,
    STREAM_CHUNKS,
)


class Unavailable(Exception):
    """The variant cannot be built here (package missing or API not there yet)."""


@dataclass
class Wrapped:
    app: Any
    flush: Callable[[], None]
    config: str


def noop() -> None:
    return None


# Variant name -> label in the report.
LABELS: dict[str, str] = {
    "bare": "bare app",
    "ours": "alf-analytics (ours)",
    "ours_skip": "ours, request skipped (skip_paths)",
    "ours_noredact": "ours, default_redactions=False",
    "moesif": "Moesif",
    "apitally": "apitally",
    "readme": "readme-metrics",
    "otel": "OpenTelemetry (BSP + OTLP/HTTP)",
    "api_analytics": "api-analytics",
}
VARIANTS: list[str] = list(LABELS)
# Our middleware with one option changed, each run only in the scenario it is about: the
# cost of a skipped request (GET, the same request as "ours" but its path in skip_paths)
# and the cost of redaction (POST with bodies on, "ours" minus this).
OURS_OPTIONS: dict[str, str] = {"ours_skip": "get", "ours_noredact": "post"}
PEERS: list[str] = [v for v in VARIANTS if v not in ("bare", "ours", *OURS_OPTIONS)]


def runs_in(variant: str, scenario: str) -> bool:
    """Whether ``variant`` is measured in ``scenario`` (the option variants in one only)."""
    only = OURS_OPTIONS.get(variant)
    return only is None or only == scenario


# Variant name -> distributions whose versions the report lists.
DISTRIBUTIONS: dict[str, list[str]] = {
    "bare": ["starlette", "flask", "werkzeug", "uvicorn", "gunicorn"],
    "ours": ["alf-analytics"],
    "ours_skip": [],
    "ours_noredact": [],
    "moesif": ["moesifasgi", "moesifwsgi", "moesifapi"],
    "apitally": ["apitally"],
    "readme": ["readme-metrics"],
    "otel": [
        "opentelemetry-instrumentation-asgi",
        "opentelemetry-instrumentation-wsgi",
        "opentelemetry-sdk",
        "opentelemetry-exporter-otlp-proto-http",
    ],
    "api_analytics": ["api-analytics"],
}


def events_per_request(variant: str, framework: str, scenario: str) -> int:
    """How many events the sink counts for one request of this variant."""
    if variant in ("bare", "ours_skip"):
        return 0
    if variant == "readme" and framework == "flask" and scenario == "stream":
        return STREAM_CHUNKS  # readme-metrics WSGI logs once per yielded chunk
    return 1


def inner(framework: str, app: Any) -> Any:
    return app if framework == "starlette" else app.wsgi_app


def build_bare(framework: str, app: Any, sink: str, bodies: bool) -> Wrapped:
    return Wrapped(inner(framework, app), noop, "no middleware")


# The path the skip variant skips: the GET scenario's path, by prefix.
SKIP_PATHS = ["/items/*"]


def build_ours(framework: str, app: Any, sink: str, bodies: bool, **options: Any) -> Wrapped:
    try:
        import alf_analytics

        cls = (
            alf_analytics.AnalyticsASGIMiddleware
            if framework == "starlette"
            else alf_analytics.AnalyticsWSGIMiddleware
        )
        flush_api = alf_analytics.flush
    except (ImportError, AttributeError) as exc:
        raise Unavailable(f"alf_analytics API not importable: {exc}") from exc
    try:
        wrapped = cls(
            inner(framework, app),
            service_token=SERVICE_TOKEN,
            collector_url=sink,
            log_body=bodies,
            **options,
        )
    except (TypeError, ValueError) as exc:
        if not options:
            raise
        raise Unavailable(f"option {', '.join(options)} not accepted: {exc}") from exc

    def flush() -> None:
        flush_api(timeout=10.0)

    changed = ", ".join(f"{k}={v!r}" for k, v in options.items())
    return Wrapped(
        wrapped, flush, "log_body as the scenario says, " + (changed or "other options default")
    )


def build_ours_skip(framework: str, app: Any, sink: str, bodies: bool) -> Wrapped:
    return build_ours(framework, app, sink, bodies, skip_paths=SKIP_PATHS)


def build_ours_noredact(framework: str, app: Any, sink: str, bodies: bool) -> Wrapped:
    return build_ours(framework, app, sink, bodies, default_redactions=False)


def build_moesif(framework: str, app: Any, sink: str, bodies: bool) -> Wrapped:
    settings: dict[str, Any] = {
        "APPLICATION_ID": MOESIF_APPLICATION_ID,
        "BASE_URI": sink,
        "LOG_BODY": bodies,
        "DEBUG": False,
    }
    try:
        if framework == "starlette":
            from moesifasgi import MoesifMiddleware as AsgiMoesif
        else:
            from moesifwsgi import MoesifMiddleware as WsgiMoesif
    except ImportError as exc:
        raise Unavailable(f"moesif not installed: {exc}") from exc
    if framework == "starlette":
        # One batch per 1 s scheduler tick: a larger batch keeps delivery from lagging.
        settings["BATCH_SIZE"] = 1000
        mw = AsgiMoesif(app, settings=settings)
        pool = mw.event_logger.worker_pool

        def flush_asgi() -> None:
            while not pool.event_queue.empty():
                pool.batcher.create_batch()  # what its scheduler tick does

        return Wrapped(
            mw, flush_asgi, "ASGI: BASE_URI=sink, LOG_BODY as the scenario says, BATCH_SIZE=1000"
        )
    mw = WsgiMoesif(app.wsgi_app, settings)
    # No flush API short of shutting it down: its batcher cuts a batch within 2 s.
    return Wrapped(
        mw, noop, "WSGI: BASE_URI=sink, LOG_BODY as the scenario says, defaults otherwise"
    )


def build_apitally(framework: str, app: Any, sink: str, bodies: bool) -> Wrapped:
    os.environ["APITALLY_OTLP_ENDPOINT"] = sink
    try:
        import apitally
        from apitally.shared import activation
    except ImportError as exc:
        raise Unavailable(f"apitally not installed: {exc}") from exc
    apitally.init(
        app,
        write_token=APITALLY_WRITE_TOKEN,
        capture_request_body=bodies,
        capture_response_body=bodies,
    )

    def flush() -> None:
        worker = activation.export_worker
        if worker is not None:
            worker.run_cycle(None)  # one export cycle, as its thread does every 15 s

    return Wrapped(
        inner(framework, app),
        flush,
        "APITALLY_OTLP_ENDPOINT=sink, capture_request/response_body as the scenario says",
    )


def build_readme(framework: str, app: Any, sink: str, bodies: bool) -> Wrapped:
    os.environ["README_METRICS_SERVER"] = sink
    try:
        from readme_metrics import MetricsApiConfig
        from readme_metrics.Metrics import Metrics
    except ImportError as exc:
        raise Unavailable(f"readme-metrics not installed: {exc}") from exc

    def grouping(request: Any) -> dict[str, str]:
        return {"id": "user-42", "label": "bench user", "email": "bench@example.test"}

    cfg = MetricsApiConfig(
        README_API_KEY,
        grouping,
        base_log_url="http://127.0.0.1/docs",  # avoids the blocking project-URL lookup
        buffer_length=100,  # default 1 starts a thread per request
    )
    if framework == "starlette":
        from readme_metrics.fastapi import ReadMeMetricsMiddleware

        mw: Any = ReadMeMetricsMiddleware(app, cfg)
    else:
        from readme_metrics.MetricsMiddleware import MetricsMiddleware

        mw = MetricsMiddleware(app.wsgi_app, cfg)
    core: Metrics = mw.metrics_core
    return Wrapped(
        mw,
        core.exit_handler,
        "README_METRICS_SERVER=sink, base_log_url set, buffer_length=100; bodies always captured",
    )


def build_otel(framework: str, app: Any, sink: str, bodies: bool) -> Wrapped:
    os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = sink
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        if framework == "starlette":
            from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware as Asgi
        else:
            from opentelemetry.instrumentation.wsgi import OpenTelemetryMiddleware as Wsgi
    except ImportError as exc:
        raise Unavailable(f"opentelemetry not installed: {exc}") from exc
    provider = TracerProvider(resource=Resource.create({"service.name": "bench"}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=f"{sink}/v1/traces")))
    if framework == "starlette":
        mw: Any = Asgi(app, tracer_provider=provider)
    else:
        mw = Wsgi(app.wsgi_app, tracer_provider=provider)

    def flush() -> None:
        provider.force_flush()

    return Wrapped(
        mw, flush, "OTLP endpoint=sink, BatchSpanProcessor defaults; no body capture exists"
    )


def build_api_analytics(framework: str, app: Any, sink: str, bodies: bool) -> Wrapped:
    try:
        from api_analytics import core
    except ImportError as exc:
        raise Unavailable(f"api-analytics not installed: {exc}") from exc
    if framework == "starlette":
        from api_analytics.fastapi import Analytics
        from api_analytics.fastapi import Config as AsgiConfig

        mw: Any = Analytics(app, API_ANALYTICS_KEY, AsgiConfig(server_url=sink))
        name = "FastAPI"
    else:
        from api_analytics.flask import Config as FlaskConfig
        from api_analytics.flask import add_middleware

        add_middleware(app, API_ANALYTICS_KEY, FlaskConfig(server_url=sink))
        mw, name = app.wsgi_app, "Flask"

    def flush() -> None:
        # It posts only once a minute and has no flush: post what is buffered, as it would.
        pending, core._requests = core._requests, []
        if pending:
            core._post_requests(API_ANALYTICS_KEY, pending, name, 0, sink)

    return Wrapped(mw, flush, "server_url=sink; no body capture exists")


BUILDERS: dict[str, Callable[[str, Any, str, bool], Wrapped]] = {
    "bare": build_bare,
    "ours": build_ours,
    "ours_skip": build_ours_skip,
    "ours_noredact": build_ours_noredact,
    "moesif": build_moesif,
    "apitally": build_apitally,
    "readme": build_readme,
    "otel": build_otel,
    "api_analytics": build_api_analytics,
}


def build(variant: str, framework: str, app: Any, sink: str, bodies: bool) -> Wrapped:
    return BUILDERS[variant](framework, app, sink, bodies)
