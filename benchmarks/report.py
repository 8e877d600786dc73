"""Turns the raw results of a run into tables, the targets verdict and BENCHMARKS.md.

Per (framework, scenario) and variant, the figure of a run is the median over rounds of
each round's per-request median (time on the request path) or per-request mean (CPU).
"Added" is the variant minus the bare app in the same run; "× bare" is the ratio of
absolute figures; "÷ best peer" divides a variant's added time by the smallest added time
of any peer in the same scenario.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from common import SCENARIOS
from variants import LABELS, PEERS, VARIANTS

FRAMEWORKS = ("starlette", "flask")
FW_LABEL = {"starlette": "Starlette (ASGI)", "flask": "Flask (WSGI)"}
SERVER_LABEL = {"starlette": "uvicorn + Starlette", "flask": "gunicorn (sync) + Flask"}

# The targets.
T_ADDED_OFF_US = 10.0
T_ADDED_ON_US = 20.0
T_CPU_OFF_US = 30.0
T_PEER_FRACTION = 0.2
T_SERVER_FRACTION = 0.95
T_WORKER_EPS = 30_000.0
T_STREAM_GROWTH_KIB = 64.0  # one chunk: "flat" = a 4 MiB response costs no more than 1 MiB


def med(values: Iterable[float]) -> float:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(vals) if vals else math.nan


def table_head(*columns: str, left: int = 1, last_left: bool = False) -> list[str]:
    """Markdown header and separator; the first ``left`` columns (and the last one if
    ``last_left``) left-aligned, the others right-aligned."""
    aligns = ["---"] * left + ["---:"] * (len(columns) - left)
    if last_left:
        aligns[-1] = "---"
    return ["| " + " | ".join(columns) + " |", "|" + "|".join(aligns) + "|"]


def md_row(*cells: object) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def fmt(value: float | None, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:,.{digits}f}"


@dataclass
class Cell:
    """One variant in one (framework, scenario), aggregated over rounds."""

    variant: str
    ok: bool = False
    reason: str = ""
    median_us: float = math.nan
    p90_us: float = math.nan
    cpu_us: float = math.nan
    ttfb_us: float = math.nan
    peak_kib: float = math.nan
    peak4_kib: float = math.nan
    retained_kib: float = math.nan
    delivered: float = math.nan  # fraction of expected events (worst round)
    config: str = ""
    rounds: int = 0
    raw: list[dict[str, Any]] = field(default_factory=list)


def aggregate(results: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Cell]]:
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in results:
        groups[(r["framework"], r["scenario"], r["variant"])].append(r)
    table: dict[tuple[str, str], dict[str, Cell]] = defaultdict(dict)
    for (fw, sc, variant), rows in groups.items():
        cell = Cell(variant)
        ok = [r for r in rows if r.get("status") == "ok"]
        if not ok:
            cell.reason = f"{rows[0].get('status')} ({rows[0].get('reason', '')})"
        else:
            cell.ok = True
            cell.rounds = len(ok)
            cell.median_us = med(r["median_us"] for r in ok)
            cell.p90_us = med(r["p90_us"] for r in ok)
            cell.cpu_us = med(r["cpu_us"] for r in ok)
            cell.ttfb_us = med(r.get("ttfb_us", math.nan) for r in ok)
            cell.peak_kib = med(r.get("peak_kib", math.nan) for r in ok)
            cell.peak4_kib = med(r.get("peak4_kib", math.nan) for r in ok)
            cell.retained_kib = med(r.get("retained_kib", math.nan) for r in ok)
            fractions = [
                r["delivered_events"] / r["expected_events"] for r in ok if r["expected_events"]
            ]
            cell.delivered = min(fractions) if fractions else math.nan
            cell.config = ok[0].get("config", "")
            cell.raw = ok
        table[(fw, sc)][variant] = cell
    return table


def best_peer(cells: dict[str, Cell], attr: str = "median_us") -> tuple[str, float] | None:
    bare = cells.get("bare")
    if bare is None or not bare.ok:
        return None
    added = [
        (getattr(cells[p], attr) - getattr(bare, attr), p)
        for p in PEERS
        if p in cells and cells[p].ok
    ]
    if not added:
        return None
    value, name = min(added)
    return name, value


def inprocess_table(fw: str, sc: str, cells: dict[str, Cell]) -> list[str]:
    bare = cells.get("bare")
    best = best_peer(cells)
    stream = sc == "stream"
    columns = ["variant", "µs/request (median)", "p90", "added µs", "× bare", "÷ best peer"]
    columns += ["CPU µs/request", "added CPU µs", "delivered"]
    if stream:
        columns += ["first byte µs", "peak KiB, 1 MiB", "peak KiB, 4 MiB"]
    lines = [f"#### {FW_LABEL[fw]}: {SCENARIOS[sc].label}", "", *table_head(*columns)]
    for v in VARIANTS:
        c = cells.get(v)
        if c is None:
            continue
        if not c.ok:
            lines.append(f"| {LABELS[v]} | n/a: {c.reason} |" + " |" * (8 + 3 * stream))
            continue
        added = c.median_us - bare.median_us if bare and bare.ok else math.nan
        cpu_added = c.cpu_us - bare.cpu_us if bare and bare.ok else math.nan
        ratio = c.median_us / bare.median_us if bare and bare.ok else math.nan
        vs_best = added / best[1] if best and v != "bare" and best[1] > 0 else math.nan
        delivered = "–" if v == "bare" else f"{c.delivered:.0%}"
        row = (
            f"| {'**' + LABELS[v] + '**' if v == 'ours' else LABELS[v]} | {fmt(c.median_us)} "
            f"| {fmt(c.p90_us)} | {fmt(added) if v != 'bare' else '–'} | {fmt(ratio, 2)} "
            f"| {fmt(vs_best, 2)} | {fmt(c.cpu_us)} | {fmt(cpu_added) if v != 'bare' else '–'} "
            f"| {delivered} |"
        )
        if stream:
            row += f" {fmt(c.ttfb_us)} | {fmt(c.peak_kib, 0)} | {fmt(c.peak4_kib, 0)} |"
        lines.append(row)
    if best:
        lines += ["", f"Best peer here: {LABELS[best[0]]} (+{fmt(best[1])} µs)."]
    return lines + [""]


def headline(table: dict[tuple[str, str], dict[str, Cell]]) -> list[str]:
    lines = table_head(
        "framework", "scenario", "bare µs", "ours added µs", "best peer", "its added µs",
        "ours ÷ best peer", "ours added CPU µs", "lowest added CPU of any peer", left=2,
    )  # fmt: skip
    for fw in FRAMEWORKS:
        for sc in SCENARIOS:
            cells = table.get((fw, sc))
            if not cells or "bare" not in cells or not cells["bare"].ok:
                continue
            bare = cells["bare"]
            ours = cells.get("ours")
            best = best_peer(cells)
            best_cpu = best_peer(cells, "cpu_us")
            o_add = ours.median_us - bare.median_us if ours and ours.ok else math.nan
            o_cpu = ours.cpu_us - bare.cpu_us if ours and ours.ok else math.nan
            b_name, b_add = (LABELS[best[0]], best[1]) if best else ("–", math.nan)
            frac = o_add / b_add if b_add and not math.isnan(b_add) else math.nan
            lines.append(
                f"| {FW_LABEL[fw]} | {SCENARIOS[sc].label} | {fmt(bare.median_us)} | "
                f"{fmt(o_add)} | {b_name} | {fmt(b_add)} | {fmt(frac, 2)} | {fmt(o_cpu)} | "
                f"{fmt(best_cpu[1] if best_cpu else math.nan)} |"
            )
    return lines + [""]


def server_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = table_head(
        "server", "variant", "requests/s", "% of bare", "delivered after load",
        "delivered after exit", "note", left=2, last_left=True,
    )  # fmt: skip
    by: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by[(r["framework"], r["variant"])].append(r)
    for fw in FRAMEWORKS:
        bare_rps = med(r["rps"] for r in by.get((fw, "bare"), []) if r.get("status") == "ok")
        for v in VARIANTS:
            rs = by.get((fw, v))
            if not rs:
                continue
            ok = [r for r in rs if r.get("status") == "ok"]
            if not ok:
                lines.append(
                    f"| {SERVER_LABEL[fw]} | {LABELS[v]} | n/a: {rs[0].get('reason')} | | | | |"
                )
                continue
            rps = med(r["rps"] for r in ok)
            served = sum(r["served"] for r in ok)
            after_load = sum(r["delivered_after_load"] for r in ok)
            after_exit = sum(r["delivered_after_exit"] for r in ok)
            notes = "; ".join(sorted({r["warning"] for r in ok if r.get("warning")}))
            dl = "–" if v == "bare" else f"{after_load / served:.0%}"
            de = "–" if v == "bare" else f"{after_exit / served:.0%}"
            lines.append(
                f"| {SERVER_LABEL[fw]} | {'**' + LABELS[v] + '**' if v == 'ours' else LABELS[v]} "
                f"| {fmt(rps, 0)} | {fmt(100 * rps / bare_rps, 0)}% | {dl} | {de} | {notes} |"
            )
    return lines + [""]


def server_fraction(rows: list[dict[str, Any]], fw: str, variant: str) -> float:
    ok = [r for r in rows if r.get("status") == "ok" and r["framework"] == fw]
    bare = med(r["rps"] for r in ok if r["variant"] == "bare")
    mine = med(r["rps"] for r in ok if r["variant"] == variant)
    return mine / bare if bare else math.nan


def worker_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = table_head(
        "entries", "entries/s per worker CPU-second", "worker CPU µs/entry",
        "wall entries/s (produce + drain)", "wire bytes/entry (gzip)", "JSON bytes/entry",
        "compression",
    )  # fmt: skip
    for r in rows:
        what = "4 KiB bodies each way" if r.get("bodies") else "GET, bodies off"
        if r.get("status") != "ok":
            lines.append(f"| {what} | n/a: {r.get('reason')} | | | | | |")
            continue
        lines.append(
            f"| {what} ({r['entries']:,}) | {fmt(r['entries_per_cpu_s'], 0)} | "
            f"{fmt(r['worker_us_per_entry'])} | {fmt(r['wall_entries_per_s'], 0)} | "
            f"{fmt(r['wire_bytes_per_entry'])} | {fmt(r['json_bytes_per_entry'], 0)} | "
            f"{fmt(r['compression_ratio'])}× |"
        )
    return lines + [""]


def memory_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| measurement | bodies off | bodies on (4 KiB each way) |", "|---|---:|---:|"]

    def pick(mode: str, bodies: bool) -> dict[str, Any] | None:
        for r in rows:
            if r.get("mode") == mode and bool(r.get("bodies")) == bodies:
                return r
        return None

    def cell(r: dict[str, Any] | None, key: str, digits: int = 0) -> str:
        if r is None:
            return "–"
        if r.get("status") != "ok":
            return f"n/a: {r.get('reason')}"
        return fmt(r[key], digits)

    q0, q1 = pick("queued", False), pick("queued", True)
    r0, r1 = pick("rss", False), pick("rss", True)
    lines.append(
        md_row(
            "bytes held per queued entry (tracemalloc)",
            cell(q0, "bytes_per_entry"),
            cell(q1, "bytes_per_entry"),
        )
    )
    lines.append(md_row("queue_size (default)", cell(r0, "queue_size"), cell(r1, "queue_size")))
    for label, key in (
        ("RSS before the first request, MiB", "rss_before_mib"),
        ("peak RSS with the queue full, MiB", "peak_rss_mib"),
    ):
        lines.append(md_row(label, cell(r0, key, 1), cell(r1, key, 1)))
    pushed = [f"{cell(r, 'requests')} / {cell(r, 'dropped_queue_full')}" for r in (r0, r1)]
    lines.append(md_row("requests pushed / dropped as queue_full", *pushed))
    return lines + [""]


@dataclass
class Verdict:
    target: str
    measured: str
    met: bool | None  # None: could not be measured


def verdicts(
    table: dict[tuple[str, str], dict[str, Cell]],
    servers: list[dict[str, Any]],
    worker: list[dict[str, Any]],
) -> list[Verdict]:
    out: list[Verdict] = []

    def added(fw: str, sc: str, attr: str = "median_us") -> float:
        cells = table.get((fw, sc), {})
        o, b = cells.get("ours"), cells.get("bare")
        if not o or not b or not o.ok or not b.ok:
            return math.nan
        return float(getattr(o, attr) - getattr(b, attr))

    def verdict(
        target: str, values: dict[str, float], limit: float, unit: str, lower: bool = True
    ) -> Verdict:
        shown = ", ".join(f"{k} {fmt(v, 2 if unit == '×' else 1)}{unit}" for k, v in values.items())
        if any(math.isnan(v) for v in values.values()):
            return Verdict(target, shown or "not measured", None)
        ok = all((v <= limit) if lower else (v >= limit) for v in values.values())
        return Verdict(target, shown, ok)

    out.append(
        verdict(
            f"added time on the request path, bodies off: ≤ {T_ADDED_OFF_US:g} µs "
            "(Starlette and Flask)",
            {FW_LABEL[fw]: added(fw, "get") for fw in FRAMEWORKS},
            T_ADDED_OFF_US,
            " µs",
        )
    )
    out.append(
        verdict(
            f"added time with 4 KiB bodies on: ≤ {T_ADDED_ON_US:g} µs",
            {FW_LABEL[fw]: added(fw, "post") for fw in FRAMEWORKS},
            T_ADDED_ON_US,
            " µs",
        )
    )
    out.append(
        verdict(
            f"added CPU per request incl. background sending, bodies off: ≤ {T_CPU_OFF_US:g} µs",
            {FW_LABEL[fw]: added(fw, "get", "cpu_us") for fw in FRAMEWORKS},
            T_CPU_OFF_US,
            " µs",
        )
    )
    fractions: dict[str, float] = {}
    for fw in FRAMEWORKS:
        for sc in ("get", "post"):
            best = best_peer(table.get((fw, sc), {}))
            a = added(fw, sc)
            fractions[f"{FW_LABEL[fw]} {sc.upper()}"] = (
                a / best[1] if best and best[1] > 0 else math.nan
            )
    out.append(
        verdict(
            f"at most {T_PEER_FRACTION:.0%} (one fifth) of the best peer's added time, same run",
            fractions,
            T_PEER_FRACTION,
            "×",
        )
    )
    out.append(
        verdict(
            f"through a real server: ≥ {T_SERVER_FRACTION:.0%} of the bare app's requests/s",
            {SERVER_LABEL[fw]: 100 * server_fraction(servers, fw, "ours") for fw in FRAMEWORKS},
            100 * T_SERVER_FRACTION,
            "%",
            lower=False,
        )
    )
    w = next((r for r in worker if not r.get("bodies") and r.get("status") == "ok"), None)
    out.append(
        verdict(
            f"the worker sustains ≥ {T_WORKER_EPS:,.0f} entries/s on one core (bodies off)",
            {"entries/s per CPU-second": w["entries_per_cpu_s"] if w else math.nan},
            T_WORKER_EPS,
            "",
            lower=False,
        )
    )
    out.append(
        verdict(
            f"streamed response, first byte not delayed: ≤ +{T_ADDED_ON_US:g} µs over bare "
            "(the bodies-on budget)",
            {FW_LABEL[fw]: added(fw, "stream", "ttfb_us") for fw in FRAMEWORKS},
            T_ADDED_ON_US,
            " µs",
        )
    )
    growth: dict[str, float] = {}
    for fw in FRAMEWORKS:
        o = table.get((fw, "stream"), {}).get("ours")
        growth[FW_LABEL[fw]] = o.peak4_kib - o.peak_kib if o and o.ok else math.nan
    out.append(
        verdict(
            "streamed response, memory flat: peak for a 4 MiB response ≤ peak for 1 MiB "
            f"+ {T_STREAM_GROWTH_KIB:g} KiB",
            growth,
            T_STREAM_GROWTH_KIB,
            " KiB",
        )
    )
    return out


def targets_section(vs: list[Verdict]) -> list[str]:
    lines = ["| target | measured | met |", "|---|---|---|"]
    for v in vs:
        met = "n/a" if v.met is None else ("yes" if v.met else "**no**")
        lines.append(f"| {v.target} | {v.measured} | {met} |")
    return lines + [""]


PEER_NOTES: dict[str, str] = {
    "moesif": "headers and bodies (LOG_BODY); the WSGI middleware drains the whole response "
    "before returning it, the ASGI one is a BaseHTTPMiddleware that keeps every chunk; gzip "
    "JSON batches (ASGI: one batch per 1 s scheduler tick)",
    "apitally": "an OpenTelemetry distribution: server span, logs and metrics, request headers "
    "off by default, bodies up to 50 kB when enabled; gzip protobuf spooled and exported every "
    "15 s (here: one export cycle as its flush)",
    "readme": "one HAR entry per request, bodies always captured (no option to turn "
    "them off), uncompressed JSON; the WSGI middleware logs once per response chunk, the "
    "Starlette/FastAPI one buffers the whole response",
    "otel": "server span plus send/receive spans, no bodies; BatchSpanProcessor (512 spans or "
    "5 s), uncompressed OTLP/HTTP protobuf",
    "api_analytics": "nine fields per request (method, path, status, response time, user "
    "agent, IP, host, user id, time): no headers, query or bodies; appended to a list on the "
    "request path and posted once a minute, nothing at exit (here: its poster called as flush)",
}


def configs_section(table: dict[tuple[str, str], dict[str, Cell]]) -> list[str]:
    seen: dict[str, set[str]] = defaultdict(set)
    reasons: dict[str, str] = {}
    for cells in table.values():
        for v, c in cells.items():
            if c.ok:
                seen[v].add(c.config)
            else:
                reasons[v] = c.reason
    lines = ["| variant | configuration |", "|---|---|"]
    for v in VARIANTS:
        if v in seen:
            lines.append(f"| {LABELS[v]} | {' / '.join(sorted(seen[v]))} |")
        elif v in reasons:
            lines.append(f"| {LABELS[v]} | n/a: {reasons[v]} |")
    lines += ["", "What the peers record, which explains part of their cost:", ""]
    lines += [f"- {LABELS[v]}: {note}" for v, note in PEER_NOTES.items() if v in LABELS]
    return lines + [""]


def render(results: dict[str, Any]) -> str:
    meta = results["meta"]
    table = aggregate(results["inprocess"])
    vs = verdicts(table, results["servers"], results["worker"])
    out = ["# Benchmarks", ""]
    out += [
        "Produced by `make bench` (the benchmark in `benchmarks/`, see `benchmarks/run.py`). "
        "Numbers are from one run on the machine below; rerun to compare on yours.",
        "",
        f"- Command: `{meta['command']}`"
        + (" (quick: smoke figures only)" if meta["quick"] else ""),
        f"- Date: {meta['date']} (run took {meta['duration_s'] / 60:.1f} min)",
        f"- Package source measured: commit {meta.get('revision', 'unknown')}",
        f"- Machine: {meta['cpu']}, {meta['cores']} cores, {meta['memory_gib']:.0f} GiB; "
        f"{meta['platform']}",
        f"- Python: {meta['python']}",
        f"- Other load: CPUs {fmt(100 * meta.get('busy_at_start', math.nan), 0)}% busy just "
        "before the start; 1-minute load average at start / end "
        f"{' / '.join(fmt(x, 2) for x in meta.get('load_average', []))} "
        "(other work on the machine makes every figure noisier)",
        f"- Load generator for the server runs: {meta['load_generator']}",
        f"- In-process: {meta['rounds']} interleaved rounds, one process per variant per round; "
        f"{meta['requests']:,} timed requests per process "
        f"({meta['stream_requests']:,} for the stream) "
        f"after {meta['warmup']:,} warm-up requests",
        "",
        "Versions:",
        "",
    ]
    out += [f"- {name} {ver}" for name, ver in meta["versions"].items()]
    out += ["", "## Headline", ""]
    out += [
        "Added = the variant's figure minus the bare app's in the same run. "
        "Time is the median wall time of one request on the request path, CPU the process's CPU "
        "time per request (all threads) until the sink had received everything.",
        "",
    ]
    out += headline(table)
    out += ["## Targets", ""] + targets_section(vs)
    out += ["## In-process, per scenario", ""]
    out += [
        "× bare: absolute time over the bare app's. ÷ best peer: added time over the smallest "
        "added time of any peer in the same scenario. Delivered: share of the requests the sink "
        "received an event for (worst round). Stream: first byte = time from the call to the "
        "first body chunk; peak = tracemalloc peak of one request plus the variant's flush of "
        "its event (all threads), for the 1 MiB response and for a 4 MiB one.",
        "",
    ]
    for fw in FRAMEWORKS:
        for sc in SCENARIOS:
            if (fw, sc) in table:
                out += inprocess_table(fw, sc, table[(fw, sc)])
    out += ["## Through a real server (GET, bodies off)", ""]
    out += [
        f"{meta['server_rounds']} interleaved round(s) of {meta['server_duration']:g} s per "
        f"variant after {meta['server_warmup']:g} s of warm-up, {meta['connections']} connections. "
        "Delivered: events at the sink over requests served, within 3 s after the load and after "
        "the server was stopped with SIGTERM.",
        "",
    ]
    out += server_table(results["servers"])
    out += ["## The worker alone", ""]
    out += [
        "Entries produced through the public API as fast as possible with a plain WSGI app, then "
        "flushed to the loopback sink; worker CPU = CPU time of all non-main threads. Each "
        "request has its own X-Request-ID, so entries are not identical.",
        "",
    ]
    out += worker_table(results["worker"])
    out += ["## Memory with the collector down", ""] + memory_table(results["memory"])
    out += ["## How each variant was configured", ""] + configs_section(table)
    if results.get("profiles") and any(v.met is False for v in vs):
        out += ["## Profiles (targets missed)", ""]
        for title, text in results["profiles"].items():
            out += [f"### {title}", "", "```", text.rstrip(), "```", ""]
    if results.get("notes"):
        out += ["## Notes", ""] + [f"- {n}" for n in results["notes"]] + [""]
    return "\n".join(out)
