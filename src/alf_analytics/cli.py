"""The ``alf-analytics`` command: run the ALF collector service, and summarise what it stored.

Usage::

    alf-analytics collector [--host 127.0.0.1] [--port 8700] [--db alf.sqlite | postgresql://...]
                            [--token [NAME=]TOKEN ...] [--tokens-file FILE] [--read-key KEY]
                            [--insecure] [--retention 30d] [--max-body-bytes N] [--verbose] ...
    alf-analytics summary [--db alf.sqlite | postgresql://...] [--json]

Exit codes: 0 success, 1 the collector could not start, 2 bad usage, unsafe settings or an
unusable database.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
from collections.abc import Sequence
from types import FrameType
from typing import TYPE_CHECKING, Any

from ._version import __version__

if TYPE_CHECKING:
    from .collector import Summary

__all__ = ["main"]

_DEFAULT_DB = "alf.sqlite"
_log_handler: logging.Handler | None = None


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid port {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port must be between 0 and 65535, got {port}")
    return port


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="alf-analytics",
        description="Tools for ALF (API Log Format) analytics.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run = commands.add_parser(
        "collector",
        help="run the ALF collector service in the foreground",
        description="Receive ALF at /1.0.0/{single,batch} and /1.1.0/{single,batch}, validate "
        "every entry and store it in SQLite or PostgreSQL; serve the read API (/api/...) and "
        "the dashboard (/). Stops on Ctrl-C or SIGTERM: requests in flight are answered, then it "
        "exits 0.",
    )
    env = os.environ
    run.add_argument("--host", default="127.0.0.1", help="address to listen on (%(default)s)")
    run.add_argument(
        "--port", type=_port, default=8700, help="port, 0 for any free one (%(default)s)"
    )
    run.add_argument(
        "--db",
        default=env.get("ALF_COLLECTOR_DB") or _DEFAULT_DB,
        help="SQLite file, :memory:, or a postgresql:// URL (ALF_COLLECTOR_DB; %(default)s)",
    )
    run.add_argument(
        "--token",
        action="append",
        default=[],
        metavar="[NAME=]TOKEN",
        help="accept ALF with this service token (repeatable; NAME is shown instead of it)",
    )
    run.add_argument(
        "--tokens-file", metavar="FILE", help="accepted service tokens, one [NAME=]TOKEN a line"
    )
    run.add_argument(
        "--read-key",
        default=env.get("ALF_COLLECTOR_READ_KEY"),
        metavar="KEY",
        help="secret for the read API and dashboard (ALF_COLLECTOR_READ_KEY)",
    )
    run.add_argument(
        "--insecure",
        action="store_true",
        help="listen on a non-loopback address without service tokens or read key",
    )
    run.add_argument(
        "--retention",
        default=env.get("ALF_COLLECTOR_RETENTION"),
        metavar="AGE",
        help="delete entries older than this (30d, 12h; ALF_COLLECTOR_RETENTION): kept forever",
    )
    run.add_argument(
        "--idempotency-window",
        default="24h",
        metavar="AGE",
        help="how long Idempotency-Key answers are remembered (%(default)s)",
    )
    run.add_argument(
        "--max-body-bytes",
        type=_positive,
        default=1_048_576,
        help="refuse larger request bodies (as sent) with 413 (%(default)s)",
    )
    run.add_argument(
        "--max-decompressed-bytes",
        type=_positive,
        default=8 * 1_048_576,
        help="refuse bodies that inflate to more with 413 (%(default)s)",
    )
    run.add_argument(
        "--max-entries",
        type=_positive,
        default=10_000,
        help="entries (and ALF objects) per request, over it 413 (%(default)s)",
    )
    run.add_argument(
        "--body-timeout",
        type=float,
        default=30.0,
        help="seconds a client has to send its body, then 408 (%(default)s)",
    )
    run.add_argument(
        "--limit-concurrency",
        type=_positive,
        default=100,
        help="connections and requests at once, beyond it 503 (%(default)s)",
    )
    run.add_argument(
        "--ingest-concurrency",
        type=_positive,
        default=2,
        help="requests decoded and stored at once; others wait (%(default)s)",
    )
    run.add_argument(
        "--workers",
        type=_positive,
        default=1,
        help="processes (PostgreSQL only; SQLite has one writer) (%(default)s)",
    )
    run.add_argument(
        "--verbose",
        "-v",
        action="store_true",
        help="log every request (uvicorn's access log, on stdout) and more to stderr",
    )
    run.set_defaults(handler=_run_collector)

    summary = commands.add_parser(
        "summary",
        help="summarise a collector database",
        description="Entries grouped by environment, method, path and status, with count and "
        "p50/p90/p99/max of time (ms, nearest rank).",
    )
    summary.add_argument(
        "--db",
        default=os.environ.get("ALF_COLLECTOR_DB") or _DEFAULT_DB,
        help="SQLite file or postgresql:// URL (ALF_COLLECTOR_DB; %(default)s)",
    )
    summary.add_argument("--json", action="store_true", help="print JSON instead of a table")
    summary.set_defaults(handler=_run_summary)
    return parser


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is when a line is logged (as ``logging.lastResort``
    does), not the stream it was at setup: ``main()`` called in-process (tests, embedding)
    leaves its handler on the logger, and a replaced stderr may since have been closed."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def _configure_logging(verbose: bool) -> None:
    global _log_handler
    package_logger = logging.getLogger("alf_analytics")
    if _log_handler is not None:
        package_logger.removeHandler(_log_handler)
    _log_handler = _StderrHandler()
    _log_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    package_logger.addHandler(_log_handler)
    package_logger.setLevel(logging.INFO if verbose else logging.WARNING)


def _ready_server_class() -> Any:
    import uvicorn

    class ReadyServer(uvicorn.Server):
        """uvicorn's server, printing one line once the app has started."""

        def __init__(self, config: uvicorn.Config, ready_line: str) -> None:
            super().__init__(config)
            self.ready_line = ready_line

        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            if self.started:
                print(self.ready_line, flush=True)

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            super().handle_exit(sig, frame)
            # uvicorn (0.29+) raises the signal it caught again once it has shut down, so
            # that the process dies of it (exit -15/143 on SIGTERM, a traceback on Ctrl-C).
            # The collector has stopped cleanly by then (in-flight requests answered, every
            # answered entry committed, the store closed): it exits 0 instead.
            captured = getattr(self, "_captured_signals", None)
            if isinstance(captured, list):
                captured.clear()

    return ReadyServer


def _unsafe(args: argparse.Namespace, has_tokens: bool) -> str | None:
    """Why listening where asked would expose the collector, or ``None``."""
    from .collector.settings import is_loopback

    if args.insecure or is_loopback(args.host):
        return None
    missing = []
    if not has_tokens:
        missing.append("service tokens (--token, --tokens-file or ALF_COLLECTOR_TOKENS)")
    if not args.read_key:
        missing.append("a read key (--read-key or ALF_COLLECTOR_READ_KEY)")
    if not missing:
        return None
    return (
        f"refusing to listen on {args.host} without {' and '.join(missing)}: anyone who can "
        "reach it could write under any token or read every entry. Add them, listen on "
        "127.0.0.1, or pass --insecure."
    )


def _run_collector(args: argparse.Namespace) -> int:
    _configure_logging(args.verbose)
    try:
        from .collector.app import create_app
        from .collector.server import uvicorn_config
        from .collector.settings import (
            CollectorError,
            Limits,
            TokenSet,
            check_read_key,
            parse_duration,
        )
        from .collector.storage import is_postgres_url, masked_url, open_store
    except ImportError as exc:
        print(
            f"alf-analytics: the collector needs its extra: pip install 'alf-analytics[collector]'"
            f" ({exc})",
            file=sys.stderr,
        )
        return 1
    try:
        tokens = TokenSet.from_sources(args.token, args.tokens_file)
        check_read_key(args.read_key, tokens)  # else every agent's token could read all
        for value in (args.retention, args.idempotency_window):
            if value:
                parse_duration(value)
        limits = Limits(
            max_body_bytes=args.max_body_bytes,
            max_decompressed_bytes=args.max_decompressed_bytes,
            max_entries=args.max_entries,
            body_timeout=args.body_timeout,
        )
    except (CollectorError, ValueError) as exc:
        print(f"alf-analytics: {exc}", file=sys.stderr)
        return 2
    problem = _unsafe(args, bool(tokens))
    if problem is not None:
        print(f"alf-analytics: {problem}", file=sys.stderr)
        return 2
    if args.workers > 1:
        return _run_workers(args, tokens, limits, is_postgres_url(args.db))
    try:
        store = open_store(args.db, tokens=tokens)
    except CollectorError as exc:
        print(f"alf-analytics: cannot use database {masked_url(args.db)}: {exc}", file=sys.stderr)
        return 2
    try:
        app = create_app(
            store,
            tokens=tokens,
            read_key=args.read_key or "",
            limits=limits,
            retention=args.retention or None,
            idempotency_window=args.idempotency_window,
            ingest_concurrency=args.ingest_concurrency,
        )
        family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((args.host, args.port))
        except OSError as exc:
            sock.close()
            print(
                f"alf-analytics: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr
            )
            return 1
        host = f"[{args.host}]" if ":" in args.host else args.host
        url = f"http://{host}:{sock.getsockname()[1]}"
        config = uvicorn_config(
            app,
            limit_concurrency=args.limit_concurrency,
            access_log=args.verbose,
            log_level="info" if args.verbose else "warning",
        )
        server = _ready_server_class()(
            config, f"ALF collector listening on {url} (db: {store.display_name})"
        )
        server.run(sockets=[sock])
        sock.close()
        return 0 if server.started else 1
    finally:
        store.close()


_WORKER_OPTIONS = "ALF_COLLECTOR_CLI_OPTIONS"


def worker_app() -> Any:
    """The app of one ``--workers`` process: ``ALF_COLLECTOR_*`` variables plus the CLI's
    other options, handed over by the supervisor in ``ALF_COLLECTOR_CLI_OPTIONS`` (JSON)."""
    from .collector.app import create_app
    from .collector.settings import Limits, TokenSet

    options = json.loads(os.environ.get(_WORKER_OPTIONS) or "{}")
    tokens = options.get("tokens")
    return create_app(
        # The supervisor's parsed tokens, as JSON: a token may hold a comma.
        tokens=TokenSet.from_specs(tokens) if tokens is not None else None,
        limits=Limits(**options.get("limits", {})),
        idempotency_window=options.get("idempotency_window", "24h"),
        ingest_concurrency=int(options.get("ingest_concurrency", 2)),
    )


def _run_workers(args: argparse.Namespace, tokens: Any, limits: Any, postgres: bool) -> int:
    """Several uvicorn worker processes, each building the app from ALF_COLLECTOR_* variables."""
    import dataclasses

    import uvicorn

    from .collector.server import uvicorn_settings
    from .collector.settings import CollectorError
    from .collector.storage import masked_url, open_store

    if not postgres:
        print(
            "alf-analytics: --workers needs a postgresql:// --db (SQLite has one writer)",
            file=sys.stderr,
        )
        return 2
    if args.port == 0:
        print("alf-analytics: --workers needs a fixed --port (not 0)", file=sys.stderr)
        return 2
    # Opened once here, as without --workers: an unusable database is exit 2 (the workers,
    # each failing at startup, would be restarted forever), and the schema is migrated once.
    try:
        open_store(args.db, tokens=tokens).close()
    except CollectorError as exc:
        print(f"alf-analytics: cannot use database {masked_url(args.db)}: {exc}", file=sys.stderr)
        return 2
    # uvicorn binds in the supervisor, after our "listening" line, and exits 3 if it cannot:
    # refuse first, as without --workers (exit 1, saying why).
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((args.host, args.port))
        except OSError as exc:
            print(
                f"alf-analytics: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr
            )
            return 1
    os.environ["ALF_COLLECTOR_DB"] = args.db
    os.environ["ALF_COLLECTOR_READ_KEY"] = args.read_key or ""
    os.environ["ALF_COLLECTOR_RETENTION"] = args.retention or ""
    os.environ[_WORKER_OPTIONS] = json.dumps(
        {
            # Every token of --token, --tokens-file and ALF_COLLECTOR_TOKENS, parsed once
            # here; as JSON pairs, not a comma-joined ALF_COLLECTOR_TOKENS that would split
            # a token holding a comma (the workers do not read that variable again).
            "tokens": tokens.specs(),
            "limits": dataclasses.asdict(limits),
            "idempotency_window": args.idempotency_window,
            "ingest_concurrency": args.ingest_concurrency,
        }
    )
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(
        f"ALF collector listening on http://{host}:{args.port} ({args.workers} workers)",
        flush=True,
    )
    settings = uvicorn_settings(
        limit_concurrency=args.limit_concurrency,
        log_level="info" if args.verbose else "warning",
        access_log=args.verbose,
    )
    uvicorn.run(
        "alf_analytics.cli:worker_app",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        **settings,
    )
    return 0


def _format_ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}".rstrip("0").rstrip(".")


def _format_table(summary: Summary) -> str:
    header: tuple[str, ...] = ("environment", "method", "path", "status", "count")
    header += ("p50_ms", "p90_ms", "p99_ms", "max_ms")
    table: list[tuple[str, ...]] = [header]
    for row in summary.rows:
        if row.environment is None:
            environment = "-"
        else:
            environment = row.environment or '""'
        table.append(
            (
                environment,
                row.method or "-",
                row.path or "-",
                str(row.status) if row.status is not None else "-",
                str(row.count),
                _format_ms(row.p50),
                _format_ms(row.p90),
                _format_ms(row.p99),
                _format_ms(row.max),
            )
        )
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    text_columns = 3  # environment, method and path are left-aligned, numbers right-aligned
    lines = []
    for line in table:
        cells = [
            cell.ljust(width) if i < text_columns else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(line, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _plural(count: int, singular: str, plural: str | None = None) -> str:
    return f"{count} {singular if count == 1 else plural or singular + 's'}"


def _totals_line(summary: Summary) -> str:
    return (
        f"Total: {_plural(summary.entries, 'entry', 'entries')}, "
        f"{_plural(summary.service_tokens, 'distinct service token')}"
    )


def _run_summary(args: argparse.Namespace) -> int:
    try:
        from .collector import CollectorError, summarize
    except ImportError as exc:
        print(f"alf-analytics: pip install 'alf-analytics[collector]' ({exc})", file=sys.stderr)
        return 1
    try:
        summary = summarize(args.db)
    except FileNotFoundError:
        print(f"alf-analytics: database file not found: {args.db}", file=sys.stderr)
        return 2
    except CollectorError as exc:
        print(f"alf-analytics: {exc}", file=sys.stderr)
        return 2
    try:
        if args.json:
            print(json.dumps(summary.as_dict(), indent=2))
        else:
            if not summary.rows:
                print(f"No entries in {args.db}.")
            else:
                print(_format_table(summary))
                print()
            print(_totals_line(summary))
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader went away (``| head -1``): stop quietly, as Unix tools do. Python's
        # own flush at exit would fail again, so stdout now points at /dev/null.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``alf-analytics`` command line and return its exit code."""
    args = _build_parser().parse_args(argv)
    handler = args.handler
    code: int = handler(args)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
