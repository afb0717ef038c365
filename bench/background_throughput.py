"""Background-path throughput and queue wait of OpsConductor, with 1 and 2 worker processes.

``make bench-background`` (or ``.venv/bin/python bench/background_throughput.py --help``).

What is measured, for each worker count (1, then a second worker process joins)
    Every job is a one-step ``noop`` plan (class ``read``, sla ``fast``) submitted with
    ``ExecutionClient.submit(..., requested_mode="background")`` (``noop`` is estimated at 5 ms,
    so it would otherwise run immediately); every job is a different plan (name and target), so
    idempotency never short-cuts one and no two contend for a lock. Each submit is checked to come
    back ``queued`` in ``background`` mode, and each job to end ``succeeded``.

    *e2e jobs/s*: a burst of ``--jobs`` submits sent as fast as ``--submitters`` concurrent
    callers can (a closed loop) while the workers consume: jobs / (last ``ended_at`` - first
    ``created_at``), both from Postgres: the end-to-end rate from submit to ``succeeded``.
    *submit/s* is the rate the api accepted that burst at (client clock).

    *drain jobs/s* (context: the consumers alone): ``--jobs`` submitted while dispatch is drained
    (``AdminService.SetDrain``), then released: jobs / (last ``ended_at`` - first
    ``started_at``).

    *steady*: jobs arriving at a fixed rate, 70 % (``--load``) of the median e2e throughput of
    that worker count, for ``--steady-s`` seconds (an open loop: each submit is sent on schedule
    whether or not the previous one was answered). For each job: queue wait = ``started_at`` -
    ``created_at`` and end to end = ``ended_at`` - ``created_at`` (Postgres timestamps);
    percentiles by linear interpolation.

The stack is the real one (see ``_stack.py``): its own database on ``DATABASE_URL``'s server or an
embedded Postgres, a queue under a key prefix of its own on ``REDIS_URL``'s server or an embedded
Redis, worker and api processes with ``OPSC_LOG_LEVEL=WARNING`` and the worker's default consumer
concurrency (``--consumer-concurrency`` to change); everything stopped and removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import secrets
import signal
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import UUID

import asyncpg
from _measure import OTHER, CpuMeter, median_cpu, percentile
from _stack import BenchStack, noop_plan

from opsconductor.client import ExecutionClient
from opsconductor.common.logconfig import configure_logging
from opsconductor.devstack.seed import push_backlog
from opsconductor.lifecycle.queue import RedisQueue, create_redis_client

BENCH_DIR = Path(__file__).resolve().parent
CPU_GROUPS = ("client", "api", "workers", "postgres")
DEFAULT_OUTPUT = BENCH_DIR / "results" / "background_throughput.json"
SYSTEM_TENANT = "_system"
ADMIN = "bench-root"
TERMINAL = ("succeeded", "failed", "cancelled", "rejected")


class BenchFailedError(Exception):
    """A job did not go as the benchmark requires (queued in background, then succeeded)."""


@dataclass(frozen=True)
class Timing:
    """One job's Postgres timestamps, in epoch seconds."""

    created: float
    started: float
    ended: float


@dataclass(frozen=True)
class Latency:
    """Percentiles of one latency, in milliseconds."""

    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float

    @classmethod
    def of(cls, seconds: Sequence[float]) -> Latency:
        ordered = sorted(x * 1000 for x in seconds)
        return cls(
            p50_ms=percentile(ordered, 50),
            p95_ms=percentile(ordered, 95),
            p99_ms=percentile(ordered, 99),
            max_ms=ordered[-1],
            mean_ms=statistics.fmean(ordered),
        )


@dataclass
class Burst:
    jobs: int
    e2e_jobs_per_s: float
    submit_jobs_per_s: float
    drain_jobs_per_s: float
    #: CPU milliseconds per job of each process group during the e2e burst.
    cpu_ms_per_job: dict[str, float]


@dataclass
class Steady:
    target_rate: float
    achieved_rate: float
    jobs: int
    queue_wait: Latency
    end_to_end: Latency


def median_steady(runs: Sequence[Steady]) -> Steady:
    """Field by field median of steady-arrival runs (each percentile its own median)."""

    def latency(pick: str) -> Latency:
        values = [getattr(r, pick) for r in runs]
        return Latency(
            **{
                f.name: statistics.median(getattr(v, f.name) for v in values)
                for f in fields(Latency)
            }
        )

    return Steady(
        target_rate=statistics.median(r.target_rate for r in runs),
        achieved_rate=statistics.median(r.achieved_rate for r in runs),
        jobs=sum(r.jobs for r in runs),
        queue_wait=latency("queue_wait"),
        end_to_end=latency("end_to_end"),
    )


@dataclass
class WorkerResult:
    workers: int
    bursts: list[Burst] = field(default_factory=list)
    #: Median over ``steady_runs`` (jobs: their total).
    steady: Steady | None = None
    steady_runs: list[Steady] = field(default_factory=list)

    @property
    def e2e_jobs_per_s(self) -> float:
        return statistics.median(b.e2e_jobs_per_s for b in self.bursts)

    @property
    def submit_jobs_per_s(self) -> float:
        return statistics.median(b.submit_jobs_per_s for b in self.bursts)

    @property
    def drain_jobs_per_s(self) -> float:
        return statistics.median(b.drain_jobs_per_s for b in self.bursts)

    @property
    def cpu_ms_per_job(self) -> dict[str, float]:
        return median_cpu([b.cpu_ms_per_job for b in self.bursts])


class Jobs:
    """Submits jobs and watches them in Postgres."""

    def __init__(self, client: ExecutionClient, tenant_id: str, conn: asyncpg.Connection) -> None:
        self._client = client
        self._tenant_id = tenant_id
        self._conn = conn
        self._run_id = secrets.token_hex(4)
        self._count = 0

    async def submit(self) -> UUID:
        """Submit one new background job; return its execution id."""
        self._count += 1
        name = f"bg-{self._run_id}-{self._count}"
        execution = await self._client.submit(
            noop_plan(name, f"host-{name}"), tenant_id=self._tenant_id, requested_mode="background"
        )
        if (execution.status, execution.execution_mode) != ("queued", "background"):
            raise BenchFailedError(
                f"submit answered {execution.status}/{execution.execution_mode}, "
                "expected queued/background"
            )
        return UUID(execution.execution_id)

    async def closed_loop(self, jobs: int, concurrency: int) -> tuple[list[UUID], float]:
        """``jobs`` submits from ``concurrency`` callers; (ids, wall seconds)."""
        ids: list[UUID] = []
        remaining = iter(range(jobs))

        async def caller() -> None:
            for _ in remaining:
                ids.append(await self.submit())

        started = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(min(concurrency, jobs))))
        return ids, time.perf_counter() - started

    async def open_loop(self, rate: float, duration_s: float) -> tuple[list[UUID], float]:
        """Submit at ``rate`` jobs/s for ``duration_s``, on schedule; (ids, achieved rate)."""
        count = max(int(rate * duration_s), 1)
        loop = asyncio.get_running_loop()
        start = loop.time()
        tasks = []
        for i in range(count):
            delay = start + i / rate - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(self.submit()))
        ids = list(await asyncio.gather(*tasks))
        span = loop.time() - start
        return ids, count / span if span > 0 else float("inf")

    async def wait_done(self, ids: Sequence[UUID], within_s: float) -> list[Timing]:
        """Wait until every job ended; any other outcome than ``succeeded`` fails the run."""
        deadline = time.monotonic() + within_s
        while True:
            rows = await self._conn.fetch(
                "SELECT status::text AS status, count(*) AS n FROM executions"
                " WHERE id = ANY($1::uuid[]) GROUP BY status",
                list(ids),
            )
            counts = {row["status"]: int(row["n"]) for row in rows}
            bad = {s: n for s, n in counts.items() if s in TERMINAL and s != "succeeded"}
            if bad:
                raise BenchFailedError(f"jobs ended {bad}")
            if counts.get("succeeded", 0) == len(ids):
                break
            if time.monotonic() > deadline:
                raise BenchFailedError(f"jobs not done within {within_s} s: {counts}")
            await asyncio.sleep(0.05)
        rows = await self._conn.fetch(
            "SELECT extract(epoch FROM created_at)::float8 AS c,"
            " extract(epoch FROM started_at)::float8 AS s,"
            " extract(epoch FROM ended_at)::float8 AS e"
            " FROM executions WHERE id = ANY($1::uuid[])",
            list(ids),
        )
        return [Timing(row["c"], row["s"], row["e"]) for row in rows]


async def push_seeded_backlog(stack: BenchStack) -> None:
    """``BenchStack.prepare``: the copied queue rows into this run's Redis queue, as their
    submits pushed them (``opsconductor.devstack.seed``)."""
    started = time.monotonic()
    redis = create_redis_client(stack.redis_service_url, max_connections=64)
    conn = await asyncpg.connect(stack.dsn)
    try:
        pushed = await push_backlog(conn, RedisQueue(redis, prefix=stack.queue_prefix))
    finally:
        await conn.close()
        await redis.aclose()
    print(
        f"pushed {pushed} queued jobs into Redis ({time.monotonic() - started:.0f} s)",
        file=sys.stderr,
        flush=True,
    )


async def burst(
    jobs: Jobs, admin: ExecutionClient, meter: CpuMeter, args: argparse.Namespace
) -> Burst:
    """One e2e burst, then one drained batch released at once (module docstring)."""
    before = await meter.snapshot()
    ids, wall_s = await jobs.closed_loop(args.jobs, args.submitters)
    timings = await jobs.wait_done(ids, args.timeout_s)
    cpu = meter.per_request_ms(before, await meter.snapshot(), len(ids))
    e2e = len(ids) / (max(t.ended for t in timings) - min(t.created for t in timings))

    await admin.set_drain(True)
    try:
        drained, _ = await jobs.closed_loop(args.jobs, args.submitters)
    finally:
        await admin.set_drain(False)
    drained_timings = await jobs.wait_done(drained, args.timeout_s)
    drain = len(drained) / (
        max(t.ended for t in drained_timings) - min(t.started for t in drained_timings)
    )
    return Burst(
        jobs=len(ids),
        e2e_jobs_per_s=e2e,
        submit_jobs_per_s=len(ids) / wall_s,
        drain_jobs_per_s=drain,
        cpu_ms_per_job=cpu,
    )


async def steady(jobs: Jobs, rate: float, args: argparse.Namespace) -> Steady:
    ids, achieved = await jobs.open_loop(rate, args.steady_s)
    timings = await jobs.wait_done(ids, args.timeout_s)
    return Steady(
        target_rate=rate,
        achieved_rate=achieved,
        jobs=len(ids),
        queue_wait=Latency.of([t.started - t.created for t in timings]),
        end_to_end=Latency.of([t.ended - t.created for t in timings]),
    )


async def measure(
    args: argparse.Namespace, **stack_options: Any
) -> tuple[list[WorkerResult], dict[str, Any]]:
    """Start everything, measure 1 then 2 workers, stop everything.

    ``stack_options`` override the ``BenchStack`` defaults (servers, a seeded template database).
    """
    results: list[WorkerResult] = []
    env = {}
    if args.consumer_concurrency is not None:
        env["OPSC_CONSUMER_CONCURRENCY"] = str(args.consumer_concurrency)
    options: dict[str, Any] = {
        "server_dsn": os.environ.get("DATABASE_URL") or None,
        "redis_url": os.environ.get("REDIS_URL") or None,
        **stack_options,
    }
    async with BenchStack(
        log_level=args.log_level, with_redis=True, worker_env=env, **options
    ) as stack:
        await stack.bind(SYSTEM_TENANT, ADMIN, "admin")
        conn = await asyncpg.connect(stack.dsn)
        meter_conn = await asyncpg.connect(stack.dsn)

        async def processes() -> dict[str, list[int]]:
            # Workers join during the run and database backends come and go: asked each time.
            return {
                "api": [stack.services["api"].process.pid],
                "workers": [
                    child.process.pid
                    for name, child in stack.services.items()
                    if name.startswith("worker")
                ],
                "postgres": await stack.backend_pids(meter_conn),
            }

        meter = CpuMeter(CPU_GROUPS, {"client": [os.getpid()]}, processes)
        try:
            async with (
                ExecutionClient(stack.address("api"), stack.token()) as client,
                ExecutionClient(
                    stack.address("api"), stack.token_for(ADMIN, SYSTEM_TENANT)
                ) as admin,
            ):
                jobs = Jobs(client, stack.tenant_id, conn)
                print(f"warm-up: {args.warmup} jobs", file=sys.stderr, flush=True)
                warm, _ = await jobs.closed_loop(args.warmup, args.submitters)
                await jobs.wait_done(warm, args.timeout_s)
                for workers in range(1, args.max_workers + 1):
                    if workers > 1:
                        await stack.add_worker(f"worker-{workers}")
                    result = WorkerResult(workers)
                    for rep in range(args.repeat):
                        print(
                            f"{workers} worker(s): burst {rep + 1}/{args.repeat}",
                            file=sys.stderr,
                            flush=True,
                        )
                        result.bursts.append(await burst(jobs, admin, meter, args))
                    rate = args.load * result.e2e_jobs_per_s
                    for rep in range(args.steady_repeat):
                        print(
                            f"{workers} worker(s): steady {rate:.1f} jobs/s for {args.steady_s} s"
                            f" ({rep + 1}/{args.steady_repeat})",
                            file=sys.stderr,
                            flush=True,
                        )
                        result.steady_runs.append(await steady(jobs, rate, args))
                    result.steady = median_steady(result.steady_runs)
                    results.append(result)
                peak_rss = stack.peak_rss()
                stats = await admin.get_queue_stats()
                leftovers = {
                    "ready": stats.ready,
                    "leased": stats.leased,
                    "delayed": stats.delayed,
                    "dlq": stats.dlq_size,
                }
            rows = {
                "executions": await conn.fetchval("SELECT count(*) FROM executions"),
                "succeeded": await conn.fetchval(
                    "SELECT count(*) FROM executions WHERE status = 'succeeded'"
                ),
                "queue_rows": await conn.fetchval("SELECT count(*) FROM execution_queue"),
                "locks_held": await conn.fetchval("SELECT count(*) FROM execution_locks"),
            }
        finally:
            await conn.close()
            await meter_conn.close()
        meta = {
            "postgres": stack.postgres,
            "redis": stack.redis,
            "rows": rows,
            "queue_left": leftovers,
            "peak_rss_mb": peak_rss,
        }
    return results, meta


def render(results: Sequence[WorkerResult], meta: dict[str, Any]) -> str:
    lines = [
        "",
        "Background path throughput and queue wait (one-step `noop` plans, requested_mode"
        " background)",
        f"  e2e      : burst of {meta['jobs']} submits from {meta['submitters']} concurrent callers"
        " while workers consume;",
        "             jobs / (last ended_at - first created_at), Postgres clock; median of"
        f" {meta['repeat']} burst(s)",
        "  submit   : rate the api accepted that burst at (client clock)",
        f"  drain    : {meta['jobs']} jobs queued while drained, then released:"
        " jobs / (last ended_at - first started_at)",
        f"  steady   : open-loop arrivals at {meta['load']:.0%} of that e2e rate for"
        f" {meta['steady_s']} s, {meta['steady_repeat']} time(s), medians;",
        "             queue wait = started_at - created_at, e2e = ended_at - created_at",
        f"  services : OPSC_LOG_LEVEL={meta['log_level']}; consumer concurrency per worker:"
        f" {meta['consumer_concurrency']}",
        f"  machine  : {meta['cpus']} CPU(s) shared by client, api, workers, Postgres and Redis;"
        f" load average before: {meta['loadavg_before']:.2f}",
        f"             Postgres {meta['postgres']}; Redis {meta['redis']}; Python {meta['python']}",
        "",
        f"{'workers':>7}{'e2e/s':>9}{'submit/s':>10}{'drain/s':>9} |{'arrive/s':>9}{'jobs':>6}"
        f"{'wait p50':>10}{'wait p95':>10}{'wait p99':>10}{'e2e p50':>9}{'e2e p95':>9}",
    ]
    for r in results:
        s = r.steady
        assert s is not None
        lines.append(
            f"{r.workers:>7}{r.e2e_jobs_per_s:>9.1f}{r.submit_jobs_per_s:>10.1f}"
            f"{r.drain_jobs_per_s:>9.1f} |{s.achieved_rate:>9.1f}{s.jobs:>6}"
            f"{s.queue_wait.p50_ms:>10.1f}{s.queue_wait.p95_ms:>10.1f}{s.queue_wait.p99_ms:>10.1f}"
            f"{s.end_to_end.p50_ms:>9.1f}{s.end_to_end.p95_ms:>9.1f}"
        )
    lines.append("rates in jobs/s, latencies in ms")
    lines.append("per-burst e2e jobs/s (min..max):")
    for r in results:
        e2e = [b.e2e_jobs_per_s for b in r.bursts]
        lines.append(f"  {r.workers} worker(s): {min(e2e):.1f}..{max(e2e):.1f}")
    lines += [
        "",
        "CPU ms per job during the e2e bursts, median (postgres: backends of the bench database;",
        "Redis is not counted unless embedded, where it lands in other; other: the rest of the",
        "machine meanwhile, i.e. noise from outside the benchmark)",
        f"{'workers':>7}" + "".join(f"{g:>9}" for g in CPU_GROUPS) + f"{'total':>9}{OTHER:>9}",
    ]
    for r in results:
        used = r.cpu_ms_per_job
        lines.append(
            f"{r.workers:>7}"
            + "".join(f"{used[g]:>9.2f}" for g in CPU_GROUPS)
            + f"{sum(used[g] for g in CPU_GROUPS):>9.2f}{used[OTHER]:>9.2f}"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--jobs", type=int, default=400, help="jobs per burst (default 400)")
    parser.add_argument(
        "--submitters", type=int, default=16, help="concurrent submit callers (default 16)"
    )
    parser.add_argument("--repeat", type=int, default=3, help="bursts per worker count (3)")
    parser.add_argument(
        "--steady-s", type=float, default=10.0, help="steady-arrival phase length (10 s)"
    )
    parser.add_argument(
        "--steady-repeat",
        type=int,
        default=3,
        help="steady-arrival phases per worker count; percentiles are their medians (3)",
    )
    parser.add_argument(
        "--load", type=float, default=0.7, help="steady arrival rate / e2e throughput (0.7)"
    )
    parser.add_argument("--max-workers", type=int, default=2, help="worker processes (1..N; 2)")
    parser.add_argument(
        "--consumer-concurrency",
        type=int,
        help="OPSC_CONSUMER_CONCURRENCY of each worker (default: the worker's default)",
    )
    parser.add_argument("--warmup", type=int, default=50, help="unmeasured jobs first (50)")
    parser.add_argument("--timeout-s", type=float, default=300.0, help="per batch (300 s)")
    parser.add_argument(
        "--log-level", default="WARNING", help="OPSC_LOG_LEVEL of the services (default WARNING)"
    )
    parser.add_argument(
        "--output", type=Path, default=DEFAULT_OUTPUT, help=f"JSON results ({DEFAULT_OUTPUT})"
    )
    parser.add_argument(
        "--template-database",
        help="copy this database of the server (a seeded history, make bench-scale) instead of"
        " starting from an empty one",
    )
    parser.add_argument(
        "--push-backlog",
        action="store_true",
        help="push the copied database's queue rows into this run's Redis queue before the"
        " services start (with --template-database: the seeded backlog)",
    )
    args = parser.parse_args(argv)
    if (
        min(args.jobs, args.submitters, args.repeat, args.max_workers, args.steady_repeat) < 1
        or args.warmup < 0
    ):
        parser.error(
            "--jobs, --submitters, --repeat, --steady-repeat and --max-workers must be >= 1"
        )
    if not 0 < args.load <= 1 or args.steady_s <= 0:
        parser.error("--load must be in (0, 1] and --steady-s positive")
    return args


async def run_until_signalled(
    args: argparse.Namespace,
) -> tuple[list[WorkerResult], dict[str, Any]]:
    """``measure``, cancelled by SIGTERM (like Ctrl-C) so that the clean-up still happens."""
    task = asyncio.current_task()
    if task is not None:
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    return await measure(
        args,
        template_database=args.template_database,
        prepare=push_seeded_backlog if args.push_backlog else None,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging(level="WARNING", json=False, stream=sys.stderr, cache_loggers=False)
    started = time.monotonic()
    load_before = os.getloadavg()[0]
    print("starting database, Redis, worker and api...", file=sys.stderr, flush=True)
    try:
        results, stack_meta = asyncio.run(run_until_signalled(args))
    except BenchFailedError as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted; everything started was stopped and removed", file=sys.stderr)
        return 130
    run_time_s = time.monotonic() - started
    meta = {
        "jobs": args.jobs,
        "submitters": args.submitters,
        "repeat": args.repeat,
        "load": args.load,
        "steady_s": args.steady_s,
        "steady_repeat": args.steady_repeat,
        "log_level": args.log_level.upper(),
        "consumer_concurrency": args.consumer_concurrency or "default (4)",
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "loadavg_before": load_before,
        **stack_meta,
    }
    print(render(results, meta))
    print(
        "\npeak RSS (MiB, VmHWM at the end of the run): "
        + ", ".join(f"{name} {mb:.0f}" for name, mb in stack_meta["peak_rss_mb"].items())
    )
    rows = stack_meta["rows"]
    print(
        f"\nexecutions: {rows['executions']} ({rows['succeeded']} succeeded); queue rows left:"
        f" {rows['queue_rows']}; locks left: {rows['locks_held']};"
        f" Redis left: {stack_meta['queue_left']}"
    )
    document = {
        "benchmark": "background_throughput",
        "finished_at": datetime.now(UTC).isoformat(),
        "plan": "one noop step, action_class read, sla fast, requested_mode background; name and"
        " target unique per job",
        **meta,
        "results": [
            {
                "workers": r.workers,
                "e2e_jobs_per_s": r.e2e_jobs_per_s,
                "submit_jobs_per_s": r.submit_jobs_per_s,
                "drain_jobs_per_s": r.drain_jobs_per_s,
                "cpu_ms_per_job": r.cpu_ms_per_job,
                "bursts": [asdict(b) for b in r.bursts],
                "steady": asdict(r.steady) if r.steady is not None else None,
                "steady_runs": [asdict(x) for x in r.steady_runs],
            }
            for r in results
        ],
        "run_time_s": round(run_time_s, 1),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(document, indent=2) + "\n")
    print(f"run time: {run_time_s:.1f} s; results written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
