"""The submit and background figures on an empty system and at scale, side by side, with verdicts.

``make bench-scale`` (or ``.venv/bin/python bench/scale.py --help``).

1. On one Postgres and one Redis (``DATABASE_URL``/``REDIS_URL``, else embedded ones for the whole
   run), the immediate benchmark (``immediate_latency.py``: SubmitExecution at concurrency 1 and
   32) and the background benchmark (``background_throughput.py``: e2e jobs/s with 1 and 2
   workers, submit/s, queue wait at a steady 70 %) run on an empty database, as ``make bench``
   runs them.
2. A database is seeded with ``COPY`` (``opsconductor.devstack.seed``): ``--stored`` (1 000 000)
   stored executions with their steps and events, and ``--queued`` (100 000) queued jobs with
   their ``execution_queue`` rows, held ``delayed`` for a day so that they stay queued through the
   whole measurement (ready ones would be dispatched in turn with the measured jobs and drain).
3. The same two benchmarks run again, each on a copy of that database (``CREATE DATABASE ...
   TEMPLATE``); for the background one the backlog is first pushed into the run's Redis queue,
   so Redis holds 100 000 delayed jobs too, as after the real submits.

Printed: every figure empty / at scale, the change, and a verdict against issue 10's target
("no figure worse by more than 15 %"): for a latency higher is worse, for a rate lower is.
Each figure is the median of ``--repeat`` runs (3) like ``make bench``. JSON of everything in
``bench/results/scale.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import asyncpg
from _report import machine_line, progress, report, started_result, stop_on_sigterm
from _stack import (
    _DB_PREFIX,
    Servers,
    machine,
    run_script,
    servers,
    with_database,
)

from opsconductor.devstack.seed import SeedSpec, seed_history
from opsconductor.lifecycle.storage.migrate import migrate_up

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_OUTPUT = BENCH_DIR / "results" / "scale.json"
THRESHOLD = 0.15


async def seed_template(found: Servers, spec: SeedSpec) -> tuple[str, dict[str, Any]]:
    """A migrated, seeded database on the server; returns its name and the seed report."""
    name = f"{_DB_PREFIX}{os.getpid()}_{secrets.token_hex(3)}_seed"
    admin = await asyncpg.connect(found.postgres_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    dsn = with_database(found.postgres_dsn, name)
    await migrate_up(dsn)
    conn = await asyncpg.connect(dsn)
    try:
        seeded = await seed_history(conn, spec, progress=progress)
        sizes = {
            row["t"]: row["mb"]
            for row in await conn.fetch(
                "SELECT relname AS t, round(pg_total_relation_size(oid) / 1048576.0) AS mb"
                " FROM pg_class WHERE relname = ANY($1::text[])",
                ["executions", "execution_steps", "execution_events", "execution_queue"],
            )
        }
    finally:
        await conn.close()
    return name, {
        "executions": seeded.executions,
        "steps": seeded.steps,
        "events": seeded.events,
        "queue_rows": seeded.queue_rows,
        "seconds": round(seeded.seconds, 1),
        "phases": seeded.phases,
        "table_mb": {k: float(v) for k, v in sizes.items()},
    }


async def drop_database(found: Servers, name: str) -> None:
    admin = await asyncpg.connect(found.postgres_dsn)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


async def figures(
    args: argparse.Namespace, found: Servers, label: str, template: str | None
) -> dict[str, float]:
    """Both benchmarks on an empty database (``template`` None) or a copy of ``template``."""
    common = ["--repeat", str(args.repeat), "--log-level", args.log_level]
    seeded = ["--template-database", template] if template else []
    progress(f"[{label}] immediate path (concurrency 1 and 32)")
    quick = ["--requests", str(args.requests)] if args.requests else []
    imm = await asyncio.to_thread(
        run_script, "immediate_latency.py", found, [*common, *seeded, *quick]
    )
    out: dict[str, float] = {}
    for conc in ("1", "32"):
        stats = imm["median"]["immediate"][conc]
        out[f"immediate c={conc} p50 ms"] = stats["p50_ms"]
        out[f"immediate c={conc} p95 ms"] = stats["p95_ms"]
        out[f"immediate c={conc} p99 ms"] = stats["p99_ms"]
        out[f"immediate c={conc} executions/s"] = stats["throughput_rps"]
    progress(f"[{label}] background path (1 and 2 workers)")
    quick = ["--jobs", str(args.jobs), "--steady-s", "3"] if args.jobs else []
    backlog = ["--push-backlog"] if template else []
    bg = await asyncio.to_thread(
        run_script,
        "background_throughput.py",
        found,
        [*common, "--steady-repeat", str(args.repeat), *seeded, *backlog, *quick],
    )
    for r in bg["results"]:
        n = r["workers"]
        out[f"background {n}w e2e jobs/s"] = r["e2e_jobs_per_s"]
        out[f"background {n}w submit/s"] = r["submit_jobs_per_s"]
        out[f"background {n}w queue wait p50 ms"] = r["steady"]["queue_wait"]["p50_ms"]
        out[f"background {n}w queue wait p95 ms"] = r["steady"]["queue_wait"]["p95_ms"]
    out["peak RSS MiB (largest service)"] = max(
        mb for doc in (imm, bg) for name, mb in doc["peak_rss_mb"].items() if name != "echo"
    )
    return out


def worse_by(name: str, empty: float, scaled: float) -> float:
    """How much worse ``scaled`` is than ``empty`` (a fraction; negative = better)."""
    if empty <= 0:
        return 0.0
    if name.endswith("/s"):
        return (empty - scaled) / empty
    return (scaled - empty) / empty


def render(result: dict[str, Any]) -> str:
    empty, scaled = result["empty"], result["scaled"]
    seeded = result["seed"]
    lines = [
        "",
        "Scale: one-step `noop` figures, empty database vs"
        f" {seeded['executions'] - seeded['queue_rows']:,} stored +"
        f" {seeded['queue_rows']:,} queued executions",
        f"  seeded  : {seeded['executions']:,} executions, {seeded['steps']:,} steps,"
        f" {seeded['events']:,} events, {seeded['queue_rows']:,} queue rows (delayed; also in"
        f" Redis) with COPY in {seeded['seconds']:.0f} s;",
        "            table sizes MiB: "
        + ", ".join(f"{k} {v:.0f}" for k, v in sorted(seeded["table_mb"].items())),
        f"  each    : median of {result['repeat']} runs; services at OPSC_LOG_LEVEL="
        f"{result['log_level']}; Postgres {result['postgres']}; Redis {result['redis']}",
        machine_line(result, **{"after seeding": result["load_seeded"]}),
        f"  verdict : ok when no worse than {THRESHOLD:.0%} (latency: higher is worse; rate:"
        " lower is worse)",
        "",
        f"{'figure':<40}{'empty':>10}{'at scale':>10}{'change':>9}  verdict",
        "-" * 80,
    ]
    failed = 0
    for name, before in empty.items():
        after = scaled.get(name)
        if after is None:
            continue
        worse = worse_by(name, before, after)
        ok = worse <= THRESHOLD
        failed += not ok
        change = (after - before) / before if before else 0.0
        lines.append(
            f"{name:<40}{before:>10.1f}{after:>10.1f}{change:>+9.0%}  "
            + ("ok" if ok else f"WORSE by {worse:.0%}")
        )
    lines.append("")
    lines.append(
        f"{failed} figure(s) worse by more than {THRESHOLD:.0%}"
        if failed
        else f"every figure within {THRESHOLD:.0%}"
    )
    return "\n".join(lines)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    stop_on_sigterm()
    result = started_result(repeat=args.repeat, log_level=args.log_level.upper())
    async with servers(with_redis=True) as found:
        result["postgres"], result["redis"] = found.postgres, found.redis
        result["empty"] = await figures(args, found, "empty", None)
        progress(f"seeding {args.stored} stored and {args.queued} queued executions (COPY)")
        spec = SeedSpec(stored=args.stored, queued=args.queued, tenants=args.tenants)
        template, result["seed"] = await seed_template(found, spec)
        try:
            result["load_seeded"] = os.getloadavg()[0]
            result["scaled"] = await figures(args, found, "at scale", template)
        finally:
            await drop_database(found, template)
    result["machine"] = machine()
    return result


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--stored", type=int, default=1_000_000, help="stored executions (1e6)")
    parser.add_argument("--queued", type=int, default=100_000, help="queued jobs (1e5)")
    parser.add_argument("--tenants", type=int, default=100, help="tenants besides the bench one")
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure (3)")
    parser.add_argument("--log-level", default="WARNING", help="OPSC_LOG_LEVEL (WARNING)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="JSON results")
    parser.add_argument(
        "--requests", type=int, help="immediate requests per level (a quick trial; default theirs)"
    )
    parser.add_argument(
        "--jobs", type=int, help="background jobs per burst, 3 s steady (a quick trial)"
    )
    args = parser.parse_args(argv)
    if min(args.repeat, args.tenants) < 1 or min(args.stored, args.queued) < 0:
        parser.error("--repeat and --tenants must be >= 1, --stored and --queued >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return report("scale", lambda: run(args), render, args.output)


if __name__ == "__main__":
    sys.exit(main())
