"""One table of the figures ``make bench`` just measured, per log level, next to issue 10's targets.

``make bench`` runs the benchmarks (each figure there is already a median of 3 repetitions) and
then this script, which reads their JSON results from ``bench/results/`` and prints:

- the machine: CPUs usable by this process (``nproc``), their model, memory, load averages now,
  and each benchmark's own 1-minute load average before it started;
- immediate p50/p95/p99 and executions/s at concurrency 1 and 32, with the raw grpcio echo of
  the same run and the ratio immediate / echo;
- background end-to-end jobs/s with 1 and 2 workers, and queue wait p50/p95 at a steady 70 % of
  that rate;
- SQL round trips per execution (immediate, background), counted on the wire;
- CPU milliseconds per execution of each service process and of the bench database's Postgres
  backends (immediate at concurrency 32, background during the e2e bursts), with ``other``:
  what the rest of the machine used meanwhile (large: the figures above are noisy);
- peak RSS of each service process (the larger of the two benchmarks' runs);

for each log level of ``BENCH_LOG_LEVELS`` (INFO, the production default, and WARNING). A
result file that is missing or older than ``--since`` is reported as such instead of being used.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from _stack import machine

RESULTS = Path(__file__).resolve().parent / "results"

#: Issue 10's targets, per figure key (None: context, no target).
TARGETS: dict[str, tuple[str, float, str] | None] = {
    "imm1_p50": ("<=", 5.0, "ms"),
    "imm1_p99": ("<=", 20.0, "ms"),
    "imm32_rps": (">=", 500.0, "/s"),
    "bg2_e2e": (">=", 1000.0, "/s"),
    "bg2_wait_p95": ("<=", 5.0, "ms"),
    "bg1_wait_p95": ("<=", 5.0, "ms"),
    "rt_immediate": ("<=", 12.0, ""),
    "rt_background": ("<=", 8.0, ""),
    "rss": ("<=", 150.0, "MiB"),
}


def load(name: str, since: datetime | None) -> dict[str, Any] | None:
    path = RESULTS / name
    try:
        document: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    finished = datetime.fromisoformat(document.get("finished_at", "1970-01-01T00:00:00+00:00"))
    if since is not None and finished < since:
        return None
    return document


def immediate_figures(doc: dict[str, Any]) -> dict[str, str]:
    out: dict[str, str] = {}
    for conc in ("1", "32"):
        imm = doc["median"]["immediate"].get(conc)
        echo = doc["median"]["echo"].get(conc)
        ratio = doc["ratio_immediate_over_echo"].get(conc)
        if imm is None or echo is None or ratio is None:
            continue
        out[f"imm{conc}_lat"] = f"{imm['p50_ms']:.1f} / {imm['p95_ms']:.1f} / {imm['p99_ms']:.1f}"
        out[f"echo{conc}_lat"] = (
            f"{echo['p50_ms']:.2f} / {echo['p95_ms']:.2f} / {echo['p99_ms']:.2f}"
        )
        out[f"ratio{conc}"] = (
            f"x{ratio['p50_ms']:.0f} / x{ratio['p95_ms']:.0f} / x{ratio['p99_ms']:.0f}"
        )
        out[f"imm{conc}_rps"] = f"{imm['throughput_rps']:.0f}"
        out[f"echo{conc}_rps"] = f"{echo['throughput_rps']:.0f}"
        out[f"imm{conc}_p50"] = f"{imm['p50_ms']:.1f}"
        out[f"imm{conc}_p99"] = f"{imm['p99_ms']:.1f}"
        cpu = doc.get("cpu_ms_per_request", {}).get("immediate", {}).get(conc)
        if cpu is not None:
            out[f"imm{conc}_cpu"] = _cpu_text(cpu, ("api", "worker", "postgres"))
    return out


def _cpu_text(cpu: dict[str, float], groups: Sequence[str]) -> str:
    """``api 3.2 + worker 4.8 + pg 5.1 = 13.1 (other 0.8)``: CPU ms per execution."""
    parts = " + ".join(f"{g.replace('postgres', 'pg')} {cpu.get(g, 0.0):.1f}" for g in groups)
    total = sum(cpu.get(g, 0.0) for g in groups)
    return f"{parts} = {total:.1f} (other {cpu.get('other', 0.0):.1f})"


def background_figures(doc: dict[str, Any]) -> dict[str, str]:
    out: dict[str, str] = {}
    for result in doc["results"]:
        n = result["workers"]
        steady = result["steady"]
        out[f"bg{n}_e2e"] = f"{result['e2e_jobs_per_s']:.0f}"
        out[f"bg{n}_submit"] = f"{result['submit_jobs_per_s']:.0f}"
        wait = steady["queue_wait"]
        out[f"bg{n}_wait"] = (
            f"{wait['p50_ms']:.1f} / {wait['p95_ms']:.1f} @ {steady['achieved_rate']:.0f}/s"
        )
        out[f"bg{n}_wait_p95"] = f"{wait['p95_ms']:.1f}"
        if "cpu_ms_per_job" in result:
            out[f"bg{n}_cpu"] = _cpu_text(result["cpu_ms_per_job"], ("api", "workers", "postgres"))
    return out


def rss_figures(*docs: dict[str, Any] | None) -> dict[str, str]:
    peaks: dict[str, float] = {}
    for doc in docs:
        for name, mb in (doc or {}).get("peak_rss_mb", {}).items():
            if name == "echo":
                continue
            peaks[name] = max(peaks.get(name, 0.0), float(mb))
    if not peaks:
        return {}
    text = ", ".join(f"{name} {mb:.0f}" for name, mb in sorted(peaks.items()))
    return {"rss_all": text, "rss": f"{max(peaks.values()):.0f}"}


def verdict(key: str, value: str | None) -> str:
    target = TARGETS.get(key)
    if target is None or value is None:
        return ""
    op, bound, unit = target
    try:
        number = float(value)
    except ValueError:
        return ""
    ok = number <= bound if op == "<=" else number >= bound
    return f"{op} {bound:g}{unit} {'met' if ok else 'MISSED'}"


ROWS: tuple[tuple[str, str, str | None], ...] = (
    # (label, key shown, key judged against its target)
    ("immediate c=1   p50 / p95 / p99 ms", "imm1_lat", None),
    ("  echo    c=1   p50 / p95 / p99 ms", "echo1_lat", None),
    ("  immediate / echo", "ratio1", None),
    ("  immediate c=1 p50 (target)", "imm1_p50", "imm1_p50"),
    ("  immediate c=1 p99 (target)", "imm1_p99", "imm1_p99"),
    ("immediate c=1   executions/s", "imm1_rps", None),
    ("immediate c=32  p50 / p95 / p99 ms", "imm32_lat", None),
    ("  echo    c=32  p50 / p95 / p99 ms", "echo32_lat", None),
    ("  immediate / echo", "ratio32", None),
    ("immediate c=32  executions/s", "imm32_rps", "imm32_rps"),
    ("  echo    c=32  requests/s", "echo32_rps", None),
    ("background e2e jobs/s, 1 worker", "bg1_e2e", None),
    ("background e2e jobs/s, 2 workers", "bg2_e2e", "bg2_e2e"),
    ("  submit/s accepted, 2 workers", "bg2_submit", None),
    ("queue wait p50 / p95 ms at 70 %, 1 worker", "bg1_wait", None),
    ("  p95 (target)", "bg1_wait_p95", "bg1_wait_p95"),
    ("queue wait p50 / p95 ms at 70 %, 2 workers", "bg2_wait", None),
    ("  p95 (target)", "bg2_wait_p95", "bg2_wait_p95"),
    ("CPU ms / immediate execution, c=32", "imm32_cpu", None),
    ("CPU ms / background job, 1 worker", "bg1_cpu", None),
    ("CPU ms / background job, 2 workers", "bg2_cpu", None),
    ("SQL round trips / immediate execution", "rt_immediate", "rt_immediate"),
    ("SQL round trips / background job", "rt_background", "rt_background"),
    ("peak RSS MiB per process", "rss_all", None),
    ("  largest (target)", "rss", "rss"),
)


def render(levels: Sequence[str], since: datetime | None) -> tuple[str, bool]:
    columns: dict[str, dict[str, str]] = {}
    loads: list[str] = []
    missing: list[str] = []
    rt = load("round_trips.json", since)
    for level in levels:
        imm = load(f"immediate_latency_{level}.json", since)
        bg = load(f"background_throughput_{level}.json", since)
        figures: dict[str, str] = {}
        for name, doc in (("immediate", imm), ("background", bg)):
            if doc is None:
                missing.append(f"{name} at {level}")
            else:
                loads.append(f"{name} {level} {doc['loadavg_before']:.2f}")
        if imm is not None:
            figures |= immediate_figures(imm)
        if bg is not None:
            figures |= background_figures(bg)
        figures |= rss_figures(imm, bg)
        if rt is not None:
            figures["rt_immediate"] = f"{rt['immediate']['total']:.1f}"
            figures["rt_background"] = f"{rt['background']['total']:.1f}"
        columns[level] = figures
    if rt is None:
        missing.append("round trips")
    else:
        loads.append(f"round trips {rt['loadavg_before']:.2f}")
    box = machine()
    postgres = next(
        (
            d["postgres"]
            for d in (load(f"background_throughput_{lv}.json", since) for lv in levels)
            if d
        ),
        "?",
    )
    redis = next(
        (
            d["redis"]
            for d in (load(f"background_throughput_{lv}.json", since) for lv in levels)
            if d
        ),
        "?",
    )
    width = 44
    col = 50
    lines = [
        "",
        "=" * (width + col * len(levels) + 24),
        f"make bench summary ({datetime.now(UTC):%Y-%m-%d %H:%M} UTC): one-step `noop` plans;"
        " each figure the median of 3 runs",
        f"  machine : nproc {box['nproc']}, {box['cpu_model'] or 'CPU model unknown'},"
        f" {box['mem_gib']} GiB; load average now"
        f" {' / '.join(f'{x:.2f}' for x in box['loadavg'])} (1/5/15 min)",
        f"  load    : 1-min load average before each benchmark: {'; '.join(loads) or '-'}",
        f"  servers : Postgres {postgres}; Redis {redis}; services at OPSC_LOG_LEVEL per column",
        "  round trips are counted on the wire (mean of 20 executions, services at WARNING),"
        " the same in both columns",
        "",
        f"{'figure':<{width}}" + "".join(f"{lv:<{col}}" for lv in levels) + "target",
        "-" * (width + col * len(levels) + 24),
    ]
    for label, key, judged in ROWS:
        values = [columns[lv].get(key) for lv in levels]
        if all(v is None for v in values):
            continue
        cells = "".join(f"{(v or '-'):<{col}}" for v in values)
        marks = ""
        if judged is not None:
            marks = " | ".join(verdict(judged, columns[lv].get(judged)) for lv in levels)
        lines.append(f"{label:<{width}}{cells}{marks}")
    if missing:
        lines.append("")
        lines.append(
            "not measured in this run (missing or stale result file): " + ", ".join(missing)
        )
    return "\n".join(lines), not missing


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--levels", nargs="+", default=["INFO", "WARNING"])
    parser.add_argument(
        "--since",
        help="ignore result files finished before this ISO time (make bench passes its start)",
    )
    args = parser.parse_args(argv)
    since = datetime.fromisoformat(args.since) if args.since else None
    if since is not None and since.tzinfo is None:
        since = since.replace(tzinfo=UTC)
    text, complete = render([lv.upper() for lv in args.levels], since)
    print(text)
    return 0 if complete else 1


if __name__ == "__main__":
    sys.exit(main())
