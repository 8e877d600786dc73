"""The ``alf-analytics`` command: run a local ALF collector, and summarise what it stored.

Usage::

    alf-analytics collector [--host 127.0.0.1] [--port 8700] [--db alf.sqlite]
                            [--max-body-bytes N] [--no-validate] [--verbose]
    alf-analytics summary [--db alf.sqlite] [--json]

Exit codes: 0 success, 1 the collector could not start, 2 bad usage or an unusable database.
"""

from __future__ import annotations

import argparse
import json
import logging
import sqlite3
import sys
from collections.abc import Sequence

from .collector import Collector, CollectorError, Summary, summarize

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


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="alf-analytics",
        description="Tools for ALF (API Log Format) analytics.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run = commands.add_parser(
        "collector",
        help="run a local ALF collector in the foreground",
        description="Receive ALF at /1.0.0/{single,batch} and /1.1.0/{single,batch}, validate "
        "it and store it in SQLite. Stops on Ctrl-C or SIGTERM.",
    )
    run.add_argument("--host", default="127.0.0.1", help="address to listen on (%(default)s)")
    run.add_argument(
        "--port", type=_port, default=8700, help="port, 0 for any free one (%(default)s)"
    )
    run.add_argument("--db", default=_DEFAULT_DB, help="SQLite file, or :memory: (%(default)s)")
    run.add_argument(
        "--max-body-bytes",
        type=_non_negative,
        default=1_000_000,
        help="refuse larger request bodies with 413 (%(default)s)",
    )
    run.add_argument(
        "--no-validate", action="store_true", help="store ALF without checking the schema"
    )
    run.add_argument("--verbose", "-v", action="store_true", help="log every request to stderr")
    run.set_defaults(handler=_run_collector)

    summary = commands.add_parser(
        "summary",
        help="summarise a collector database",
        description="Entries grouped by environment, method, path and status, with count and "
        "p50/p90/p99/max of time (ms, nearest rank).",
    )
    summary.add_argument("--db", default=_DEFAULT_DB, help="SQLite file (%(default)s)")
    summary.add_argument("--json", action="store_true", help="print JSON instead of a table")
    summary.set_defaults(handler=_run_summary)
    return parser


def _configure_logging(verbose: bool) -> None:
    global _log_handler
    package_logger = logging.getLogger("alf_analytics")
    if _log_handler is not None:
        package_logger.removeHandler(_log_handler)
    _log_handler = logging.StreamHandler(sys.stderr)
    _log_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    package_logger.addHandler(_log_handler)
    package_logger.setLevel(logging.INFO if verbose else logging.WARNING)


def _run_collector(args: argparse.Namespace) -> int:
    _configure_logging(args.verbose)
    try:
        collector = Collector(
            args.db,
            host=args.host,
            port=args.port,
            max_body_bytes=args.max_body_bytes,
            validate=not args.no_validate,
            log_requests=args.verbose,
        )
    except ImportError as exc:
        print(f"alf-analytics: {exc}", file=sys.stderr)
        return 1
    except (CollectorError, sqlite3.Error) as exc:
        print(f"alf-analytics: cannot use database {args.db}: {exc}", file=sys.stderr)
        return 2

    def ready(running: Collector) -> None:
        print(f"ALF collector listening on {running.url} (db: {args.db})", flush=True)

    try:
        collector.serve_forever(on_ready=ready)
    except OSError as exc:
        collector.stop()
        print(f"alf-analytics: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
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
    rejected = f" ({summary.rejected_requests} rejected)" if summary.rejected_requests else ""
    return (
        f"Total: {_plural(summary.entries, 'entry', 'entries')}, "
        f"{_plural(summary.requests, 'ALF request')}{rejected}, "
        f"{_plural(summary.service_tokens, 'distinct service token')}"
    )


def _run_summary(args: argparse.Namespace) -> int:
    try:
        summary = summarize(args.db)
    except FileNotFoundError:
        print(f"alf-analytics: database file not found: {args.db}", file=sys.stderr)
        return 2
    except CollectorError as exc:
        print(f"alf-analytics: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(summary.as_dict(), indent=2))
        return 0
    if not summary.rows:
        print(f"No entries in {args.db}.")
    else:
        print(_format_table(summary))
        print()
    print(_totals_line(summary))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``alf-analytics`` command line and return its exit code."""
    args = _build_parser().parse_args(argv)
    handler = args.handler
    code: int = handler(args)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
