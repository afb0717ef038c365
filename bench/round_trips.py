"""SQL round trips per execution, counted on the wire, api and worker apart.

``make bench-round-trips`` (or ``.venv/bin/python bench/round_trips.py --help``). Postgres:
``DATABASE_URL``'s server, else an embedded one; Redis: ``REDIS_URL``'s, else an embedded one.

The api and the worker reach Postgres through a counting proxy each
(``opsconductor.devstack.pg_roundtrips``): every ``Sync`` and simple ``Query`` a client sends is
one round trip (the driver's ``BEGIN``/``COMMIT``/``SAVEPOINT``, pool reset queries and prepares
included). After a warm-up, ``--executions`` one-step ``noop`` plans are submitted one at a time,
immediate first, then background (``requested_mode=background``; the job is awaited in Postgres
through a connection of the benchmark's own, not counted), and after each one the benchmark waits
until both services are quiet (the api's periodic gauge refresh and flag cache expiry are set an
hour apart: they are not per execution). Printed: the mean round trips per execution of each
service, and the round trips of one execution by statement. ``tests/e2e/test_round_trips.py``
holds the same figures to a ceiling in ``make test``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import UUID

import asyncpg
from _stack import BenchStack, noop_plan, servers

from opsconductor.client import ExecutionClient
from opsconductor.common.logconfig import configure_logging
from opsconductor.devstack.pg_roundtrips import RoundTrip, RoundTripCounter

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_OUTPUT = BENCH_DIR / "results" / "round_trips.json"
QUIET_S = 0.25


async def quiet(counters: Sequence[RoundTripCounter], within_s: float = 30.0) -> None:
    deadline = time.monotonic() + within_s
    last, since = sum(c.count for c in counters), time.monotonic()
    while time.monotonic() < deadline:
        await asyncio.sleep(0.03)
        now = sum(c.count for c in counters)
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= QUIET_S:
            return
    raise TimeoutError("the services never went quiet")


#: An idle backend reports its table statistics within 10 s (PGSTAT_IDLE_INTERVAL; at most
#: once a second while busy): waited out before each snapshot, or the counts lag a few
#: executions behind (1.5 s gave 1.2 times the true counts).
STATS_FLUSH_S = 11.0
_WRITES = """
SELECT relname, n_tup_ins, n_tup_upd, n_tup_hot_upd, n_tup_del FROM pg_stat_user_tables
"""


async def write_snapshot(conn: asyncpg.Connection) -> tuple[dict[str, tuple[int, ...]], int]:
    """Row writes per table so far (inserted, updated, of which HOT, deleted) and the WAL
    position, once every backend had the time to report its statistics."""
    await asyncio.sleep(STATS_FLUSH_S)
    await conn.execute("SELECT pg_stat_clear_snapshot()")
    rows = await conn.fetch(_WRITES)
    lsn = await conn.fetchval("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn")
    return {r["relname"]: tuple(int(r[k]) for k in list(r.keys())[1:]) for r in rows}, int(lsn)


def writes_per_execution(
    before: tuple[dict[str, tuple[int, ...]], int],
    after: tuple[dict[str, tuple[int, ...]], int],
    n: int,
) -> dict[str, Any]:
    tables = {}
    for table, counts in sorted(after[0].items()):
        old = before[0].get(table, (0, 0, 0, 0))
        delta = [(a - b) / n for a, b in zip(counts, old, strict=True)]
        if any(delta):
            tables[table] = dict(zip(("inserted", "updated", "hot", "deleted"), delta, strict=True))
    return {"tables": tables, "wal_bytes": (after[1] - before[1]) / n}


async def wait_succeeded(conn: asyncpg.Connection, execution_id: UUID) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        status = await conn.fetchval("SELECT status FROM executions WHERE id = $1", execution_id)
        if status == "succeeded":
            return
        if status not in {"pending", "queued", "running"}:
            raise RuntimeError(f"execution {execution_id} ended {status}")
        await asyncio.sleep(0.01)
    raise TimeoutError(f"execution {execution_id} did not succeed within 30 s")


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    run = secrets.token_hex(3)
    # The proxies must know the server before the services start: DATABASE_URL's, or an
    # embedded one started first (the proxy reaches its Unix socket).
    async with (
        servers(with_redis=True) as found,
        RoundTripCounter.for_dsn(found.postgres_dsn) as api_rt,
        RoundTripCounter.for_dsn(found.postgres_dsn) as worker_rt,
        BenchStack(
            server_dsn=found.postgres_dsn,
            log_level=args.log_level,
            with_redis=True,
            redis_url=found.redis_url,
            worker_env={"OPSC_CONSUMER_CONCURRENCY": "1"},
            service_dsn={"api": api_rt.dsn, "worker": worker_rt.dsn},
            # The api's periodic work (gauges, flag cache expiry) is not per execution.
            api_env={"OPSC_GAUGE_REFRESH_S": "3600", "OPSC_FLAG_CACHE_TTL_S": "3600"},
        ) as stack,
    ):
        conn = await asyncpg.connect(stack.dsn)
        figures: dict[str, Any] = {
            "postgres": stack.postgres.replace("external", found.postgres, 1),
            "redis": found.redis,
        }
        try:
            async with ExecutionClient(stack.address("api"), stack.token()) as client:
                for mode in ("immediate", "background"):

                    async def one(i: int, mode: str = mode) -> None:
                        plan = noop_plan(f"rt-{run}-{mode}-{i}", f"rt:{run}:{mode}:{i}")
                        if mode == "immediate":
                            done = await client.submit(plan, tenant_id=stack.tenant_id)
                            if done.status != "succeeded":
                                raise RuntimeError(f"immediate execution ended {done.status}")
                            return
                        queued = await client.submit(
                            plan, tenant_id=stack.tenant_id, requested_mode="background"
                        )
                        await wait_succeeded(conn, UUID(str(queued.execution_id)))

                    for i in range(args.warmup):
                        await one(-1 - i)
                    await quiet([api_rt, worker_rt])
                    writes_before = await write_snapshot(conn)
                    marks = api_rt.mark(), worker_rt.mark()
                    for i in range(args.executions):
                        await one(i)
                        await quiet([api_rt, worker_rt])
                    api_seen, worker_seen = api_rt.since(marks[0]), worker_rt.since(marks[1])
                    figures[mode] = summarise(api_seen, worker_seen, args.executions)
                    # The bench's own wait_succeeded polls only read; the services wrote these.
                    figures[mode]["writes"] = writes_per_execution(
                        writes_before, await write_snapshot(conn), args.executions
                    )
        finally:
            await conn.close()
    return figures


def summarise(api: list[RoundTrip], worker: list[RoundTrip], n: int) -> dict[str, Any]:
    return {
        "api": len(api) / n,
        "worker": len(worker) / n,
        "total": (len(api) + len(worker)) / n,
        "by_statement": {
            side: RoundTripCounter.summary(seen).splitlines()
            for side, seen in (("api", api), ("worker", worker))
        },
    }


def render(figures: dict[str, Any], args: argparse.Namespace, load: float) -> str:
    lines = [
        "",
        f"SQL round trips per one-step `noop` execution (mean of {args.executions}, after"
        f" {args.warmup} warm-up), counted on the wire",
        f"  services: OPSC_LOG_LEVEL={args.log_level}; Postgres {figures['postgres']};"
        f" Redis {figures['redis']}; load average before: {load:.2f}",
        "",
        f"{'path':<12}{'api':>8}{'worker':>8}{'total':>8}",
    ]
    for mode in ("immediate", "background"):
        f = figures[mode]
        lines.append(f"{mode:<12}{f['api']:>8.1f}{f['worker']:>8.1f}{f['total']:>8.1f}")
    for mode in ("immediate", "background"):
        writes = figures[mode]["writes"]
        lines.append(
            f"\n{mode}: rows written per execution (pg_stat_user_tables), WAL"
            f" {writes['wal_bytes'] / 1024:.1f} KiB per execution"
        )
        lines.append(f"  {'table':<22}{'inserted':>9}{'updated':>9}{'(HOT)':>7}{'deleted':>9}")
        for table, w in writes["tables"].items():
            lines.append(
                f"  {table:<22}{w['inserted']:>9.1f}{w['updated']:>9.1f}{w['hot']:>7.1f}"
                f"{w['deleted']:>9.1f}"
            )
    for mode in ("immediate", "background"):
        for side in ("api", "worker"):
            lines.append(f"\n{mode}, {side}: round trips of {args.executions} executions")
            lines += [f"  {line}" for line in figures[mode]["by_statement"][side]]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--executions", type=int, default=20, help="measured, per path (20)")
    parser.add_argument("--warmup", type=int, default=5, help="unmeasured first, per path (5)")
    parser.add_argument("--log-level", default="WARNING", help="OPSC_LOG_LEVEL (WARNING)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="JSON results")
    args = parser.parse_args(argv)
    if args.executions < 1 or args.warmup < 1:
        parser.error("--executions and --warmup must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging(level="WARNING", json=False, stream=sys.stderr, cache_loggers=False)
    load = os.getloadavg()[0]
    figures = asyncio.run(measure(args))
    print(render(figures, args, load))
    document = {
        "benchmark": "round_trips",
        "finished_at": datetime.now(UTC).isoformat(),
        "executions": args.executions,
        "log_level": args.log_level,
        "loadavg_before": load,
        **figures,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(document, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
