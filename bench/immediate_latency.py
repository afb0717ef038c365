"""Immediate-path latency of OpsConductor next to a raw gRPC echo, measured in the same run.

``make bench-immediate`` (or ``.venv/bin/python bench/immediate_latency.py --help``).

What is measured (one *sample* = the wall time of one call, seen by the client)
    *immediate*: one ``SubmitExecution`` call made with ``ExecutionClient.submit``: plan encoding,
    the api (authenticate, RBAC, flags, validation, idempotent insert), ``WorkerService.
    RunImmediate`` (RBAC again, locks, the step, the FSM transitions and events, all in Postgres),
    the final read and the response decoding. The plan is one ``noop`` step of class ``read``;
    every submission is a *different* plan (its name and its target vary), so idempotency never
    short-cuts a request and no two requests contend for one lock.

    *echo*: one unary call of a bare ``grpc.aio`` echo server (``_echo.py``, a process of its own
    on 127.0.0.1, generic handler, bytes in and out, no interceptors) with a payload the size of a
    serialized ``SubmitExecutionRequest``: the floor any gRPC service on this machine pays.

    *postgres* (context, not in the ratio): one ``SELECT 1`` through an asyncpg pool on the bench
    database (at most ``PG_POOL_MAX`` connections, no reset query on release): the price of one
    database round trip, which the immediate path pays many times.

All three are driven from this process as a closed loop: ``concurrency`` coroutines each send their
next request as soon as the previous one answered, until ``requests`` answers were received. Each
level gets a warm-up first (not measured); the whole measurement is repeated ``--repeat`` times,
the paths alternating; the figures printed are medians over the repetitions. CPU time per request
of each process (client, echo server, api, worker, and the Postgres backends of the bench
database) is read from ``/proc`` around every batch.

The stack is the real one (see ``_stack.py``): its own database on ``DATABASE_URL``'s server or an
embedded Postgres, migrated; the worker and api processes started with ``OPSC_LOG_LEVEL=WARNING``
so that per-request INFO log lines do not dominate; everything stopped and dropped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import pstats
import secrets
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import grpc.aio
from _echo import echo_method, wait_echo_ready
from _measure import OTHER, Call, CpuMeter, Stats, closed_loop, median_cpu, median_stats
from _stack import BenchStack, noop_plan

from opsconductor.client import ExecutionClient, OpsConductorError
from opsconductor.common.logconfig import configure_logging
from opsconductor.execution.v1 import execution_service_pb2
from opsconductor.rpc.plan_codec import plan_to_proto

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_OUTPUT = BENCH_DIR / "results" / "immediate_latency.json"
PATHS = ("echo", "postgres", "immediate")
CPU_GROUPS = ("client", "echo", "api", "worker", "postgres")
#: Connections of the `postgres` baseline's pool (beyond that, its coroutines queue for one).
PG_POOL_MAX = 8


class BenchFailedError(Exception):
    """A request did not end as the benchmark requires (succeeded, immediate, not a duplicate)."""


class Calls:
    """The measured calls of each path: one ExecutionClient, one echo channel, one pg pool."""

    def __init__(
        self,
        client: ExecutionClient,
        tenant_id: str,
        echo: grpc.aio.Channel,
        payload: bytes,
        pg_pool: asyncpg.Pool,
    ) -> None:
        self._client = client
        self._tenant_id = tenant_id
        self._echo = echo_method(echo)
        self._payload = payload
        self._pg_pool = pg_pool
        self._run_id = secrets.token_hex(4)

    def make(self, path: str, label: str, requests: int) -> Call:
        if path == "immediate":
            return self._immediate(label, requests)
        if path == "echo":
            return self._echo_call(label)
        return self._postgres_call()

    def _immediate(self, label: str, requests: int) -> Call:
        # Built before the clock starts; name and target differ for every request.
        plans = [
            noop_plan(f"bench-{self._run_id}-{label}-{i}", f"bench:{self._run_id}:{label}:{i}")
            for i in range(requests)
        ]

        async def call(i: int) -> None:
            try:
                execution = await self._client.submit(plans[i], tenant_id=self._tenant_id)
            except OpsConductorError as exc:
                raise BenchFailedError(
                    f"request {label}/{i}: {type(exc).__name__} ({exc.reason}): {exc}"
                ) from exc
            if (
                execution.status != "succeeded"
                or execution.execution_mode != "immediate"
                or execution.deduplicated
            ):
                raise BenchFailedError(
                    f"request {label}/{i}: status={execution.status} "
                    f"mode={execution.execution_mode} deduplicated={execution.deduplicated} "
                    f"error={execution.error_class} {execution.error_message}"
                )

        return call

    def _echo_call(self, label: str) -> Call:
        payload = self._payload

        async def call(i: int) -> None:
            if len(await self._echo(payload)) != len(payload):
                raise BenchFailedError(f"echo {label}/{i}: payload changed on the way")

        return call

    def _postgres_call(self) -> Call:
        async def call(i: int) -> None:
            await self._pg_pool.fetchval("SELECT 1")

        return call


def submit_payload() -> bytes:
    """A serialized SubmitExecutionRequest like the measured ones: the echo's payload."""
    request = execution_service_pb2.SubmitExecutionRequest(
        tenant_id="bench-tenant",
        plan=plan_to_proto(noop_plan("bench-00000000-r0-c32-999", "bench:00000000:r0-c32:999")),
    )
    return request.SerializeToString()


# -- the run ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Level:
    concurrency: int
    requests: int


@dataclass
class Results:
    """Per path and concurrency: the Stats and CPU ms/request of every repetition."""

    stats: dict[str, dict[int, list[Stats]]]
    cpu: dict[str, dict[int, list[dict[str, float]]]]
    rows: dict[str, Any]
    postgres: str
    payload_bytes: int
    #: Peak RSS (MiB) of each process at the end of the run.
    peak_rss_mb: dict[str, float] = field(default_factory=dict)


def levels_from(args: argparse.Namespace) -> list[Level]:
    concurrencies: list[int] = args.concurrency
    requested: list[int] | None = args.requests
    if requested is None:
        counts = [300 if c == 1 else 1000 for c in concurrencies]
    elif len(requested) == 1:
        counts = requested * len(concurrencies)
    elif len(requested) == len(concurrencies):
        counts = requested
    else:
        raise SystemExit("--requests takes one value, or one per --concurrency value")
    return [Level(c, n) for c, n in zip(concurrencies, counts, strict=True)]


async def _postgres_pids(stack: BenchStack, conn: asyncpg.Connection) -> dict[str, list[int]]:
    return {"postgres": await stack.backend_pids(conn)}


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Pool ``reset`` hook that sends nothing: the baseline is exactly one round trip per call
    (asyncpg's default reset would add a second one, ``UNLISTEN *; RESET ALL; ...``)."""


async def run_levels(
    args: argparse.Namespace,
    levels: Sequence[Level],
    calls: Calls,
    meter: CpuMeter,
    results: Results,
) -> None:
    """Warm every level up, then measure each path at each level, ``repeat`` times."""
    for level in levels:
        warmup = max(args.warmup, level.concurrency)
        for path in PATHS:
            call = calls.make(path, f"warmup-c{level.concurrency}", warmup)
            await closed_loop(call, warmup, level.concurrency)
    for rep in range(args.repeat):
        for level in levels:
            for path in PATHS:
                c, n = level.concurrency, level.requests
                call = calls.make(path, f"r{rep}-c{c}", n)
                before = await meter.snapshot()
                stats = await closed_loop(call, n, c)
                after = await meter.snapshot()
                results.stats[path][c].append(stats)
                results.cpu[path][c].append(meter.per_request_ms(before, after, n))
                print(
                    f"  rep {rep + 1}/{args.repeat}  c={c:<3} {path:<9}"
                    f" p50 {stats.p50_ms:7.2f} ms  p99 {stats.p99_ms:7.2f} ms",
                    file=sys.stderr,
                    flush=True,
                )


async def measure(
    args: argparse.Namespace, levels: Sequence[Level], **stack_options: Any
) -> Results:
    """Start everything, measure (``run_levels``), stop everything.

    ``stack_options`` override the ``BenchStack`` defaults (servers, a seeded template database).
    """
    results = Results(
        stats={p: {lv.concurrency: [] for lv in levels} for p in PATHS},
        cpu={p: {lv.concurrency: [] for lv in levels} for p in PATHS},
        rows={},
        postgres="",
        payload_bytes=0,
    )
    payload = submit_payload()
    results.payload_bytes = len(payload)
    # Few connections: the server may be shared, and api and worker hold up to 20 each already.
    pg_size = min(max(lv.concurrency for lv in levels), PG_POOL_MAX)
    options: dict[str, Any] = {
        "server_dsn": os.environ.get("DATABASE_URL") or None,
        **stack_options,
    }
    async with BenchStack(
        log_level=args.log_level,
        profile_dir=args.profile,
        companions={"echo": [sys.executable, str(BENCH_DIR / "_echo.py")]},
        **options,
    ) as stack:
        results.postgres = stack.postgres
        echo = stack.services["echo"]
        await wait_echo_ready(echo.address)
        meter_conn = await asyncpg.connect(stack.dsn)
        try:
            async with (
                ExecutionClient(stack.address("api"), stack.token()) as client,
                grpc.aio.insecure_channel(echo.address) as echo_channel,
                asyncpg.create_pool(
                    stack.dsn, min_size=pg_size, max_size=pg_size, reset=_keep_session
                ) as pg_pool,
            ):
                calls = Calls(client, stack.tenant_id, echo_channel, payload, pg_pool)
                meter = CpuMeter(
                    CPU_GROUPS,
                    {"client": [os.getpid()]}
                    | {name: [child.process.pid] for name, child in stack.services.items()},
                    # Backends come and go with the pools: found again at every snapshot.
                    lambda: _postgres_pids(stack, meter_conn),
                )
                await run_levels(args, levels, calls, meter, results)
            results.peak_rss_mb = stack.peak_rss()
            results.rows = await stack.row_counts()
        finally:
            await meter_conn.close()
    return results


# -- report ----------------------------------------------------------------------------------------

_STATS_SHOWN = ("mean_ms", "p50_ms", "p95_ms", "p99_ms")


def ratios(immediate: Stats, echo: Stats) -> dict[str, float]:
    return {name: getattr(immediate, name) / getattr(echo, name) for name in _STATS_SHOWN}


def render(
    medians: dict[str, dict[int, Stats]],
    ratio: dict[int, dict[str, float]],
    cpu: dict[str, dict[int, dict[str, float]]],
    results: Results,
    meta: dict[str, Any],
) -> str:
    lines = [
        "",
        f"Immediate path vs raw gRPC echo: median of {meta['repeat']} repetition(s) per row",
        "  sample   : client-observed wall time of one SubmitExecution call",
        "             (ExecutionClient.submit), end to end api -> worker -> Postgres -> back;",
        "             one-step `noop` read plan, a different plan (name, target) every request:",
        "             no idempotency hit, no lock contention",
        f"  echo     : raw grpcio unary echo of {meta['payload_bytes']} bytes (that request's"
        " size),",
        "             bare grpc.aio server in its own process on 127.0.0.1, same client process",
        f"  postgres : `SELECT 1` through an asyncpg pool of <= {PG_POOL_MAX} connections (no reset"
        " on release):",
        "             one database round trip, for context (not in the ratio)",
        "  load     : closed loop of `conc` coroutines, one channel (pool) per path;",
        f"             {meta['warmup']} unmeasured warm-up requests per level first",
        f"  services : OPSC_LOG_LEVEL={meta['log_level']} (per-request INFO log lines would add"
        " their own cost);",
        "             no Redis configured"
        + ("; UNDER cProfile (slower)" if meta["profiled"] else ""),
        f"  machine  : {meta['cpus']} CPU(s) shared by client, echo, api, worker and Postgres",
        f"             Postgres {meta['postgres']}; Python {meta['python']}; grpcio"
        f" {meta['grpcio']}",
        f"             1-minute load average before the run: {meta['loadavg_before']:.2f}",
        "",
        f"{'conc':>4}  {'path':<10}{'count':>6}{'mean':>9}{'p50':>9}{'p95':>9}{'p99':>9}"
        f"{'req/s':>9}",
    ]
    for conc in sorted(ratio):
        for path in PATHS:
            s = medians[path][conc]
            lines.append(
                f"{conc:>4}  {path:<10}{s.count:>6}{s.mean_ms:>9.2f}{s.p50_ms:>9.2f}"
                f"{s.p95_ms:>9.2f}{s.p99_ms:>9.2f}{s.throughput_rps:>9.0f}"
            )
        r = ratio[conc]
        lines.append(
            f"{conc:>4}  {'imm/echo':<10}{'':>6}"
            + "".join(f"{'x' + format(r[n], '.1f'):>9}" for n in _STATS_SHOWN)
        )
        lines.append("")
    lines.append("latencies in ms; imm/echo = immediate / echo, statistic by statistic")
    lines.append("spread of immediate p50 / p99 over repetitions (min..max, ms):")
    for conc in sorted(ratio):
        reps = results.stats["immediate"][conc]
        p50 = [r.p50_ms for r in reps]
        p99 = [r.p99_ms for r in reps]
        lines.append(
            f"  c={conc:<3} p50 {min(p50):.2f}..{max(p50):.2f}   p99 {min(p99):.2f}..{max(p99):.2f}"
        )
    lines += [
        "",
        "CPU ms per request, median over repetitions (postgres: backends of the bench database;",
        "other: the rest of the machine meanwhile, i.e. noise from outside the benchmark)",
        f"{'conc':>4}  {'path':<10}"
        + "".join(f"{g:>9}" for g in CPU_GROUPS)
        + f"{'total':>9}{OTHER:>9}",
    ]
    for conc in sorted(ratio):
        for path in PATHS:
            used = cpu[path][conc]
            lines.append(
                f"{conc:>4}  {path:<10}"
                + "".join(f"{used[g]:>9.2f}" for g in CPU_GROUPS)
                + f"{sum(used[g] for g in CPU_GROUPS):>9.2f}{used[OTHER]:>9.2f}"
            )
    return "\n".join(lines)


def write_profiles(profile_dir: Path, top: int = 40) -> None:
    """Next to each service's ``.prof``, its top functions by cumulative and by own time."""
    for prof in sorted(profile_dir.glob("*.prof")):
        out = io.StringIO()
        stats = pstats.Stats(str(prof), stream=out)
        stats.strip_dirs().sort_stats("cumulative").print_stats(top)
        stats.sort_stats("tottime").print_stats(top)
        prof.with_suffix(".txt").write_text(out.getvalue())
        print(f"profile: {prof} (summary {prof.with_suffix('.txt')})", file=sys.stderr)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument(
        "--concurrency", type=int, nargs="+", default=[1, 32], help="levels (default: 1 32)"
    )
    parser.add_argument(
        "--requests",
        type=int,
        nargs="+",
        help="measured requests per level and repetition: one value for all levels or one per"
        " level (default: 300 at concurrency 1, 1000 otherwise)",
    )
    parser.add_argument("--repeat", type=int, default=3, help="repetitions (default 3)")
    parser.add_argument(
        "--warmup", type=int, default=50, help="unmeasured requests per level (default 50)"
    )
    parser.add_argument(
        "--log-level", default="WARNING", help="OPSC_LOG_LEVEL of the services (default WARNING)"
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=DEFAULT_OUTPUT,
        help=f"JSON results (default {DEFAULT_OUTPUT})",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="run api and worker under cProfile; write DIR/<service>.prof and .txt summaries"
        " (latencies are then inflated by the profiler)",
    )
    parser.add_argument(
        "--template-database",
        help="copy this database of the server (a seeded history, make bench-scale) instead of"
        " starting from an empty one",
    )
    args = parser.parse_args(argv)
    if args.repeat < 1 or args.warmup < 0 or min(args.concurrency) < 1:
        parser.error("--repeat and --concurrency must be >= 1, --warmup >= 0")
    if args.requests is not None and min(args.requests) < 1:
        parser.error("--requests must be >= 1")
    return args


async def run_until_signalled(args: argparse.Namespace, levels: Sequence[Level]) -> Results:
    """``measure``, cancelled by SIGTERM (like Ctrl-C) so that the clean-up still happens."""
    task = asyncio.current_task()
    if task is not None:
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    return await measure(args, levels, template_database=args.template_database)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    levels = levels_from(args)
    # The set-up (migrations, flags) logs through structlog: only warnings, to stderr.
    configure_logging(level="WARNING", json=False, stream=sys.stderr, cache_loggers=False)
    started = time.monotonic()
    load_before = os.getloadavg()[0]
    print("starting database, worker, api and echo server...", file=sys.stderr, flush=True)
    try:
        results = asyncio.run(run_until_signalled(args, levels))
    except BenchFailedError as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted; everything started was stopped and dropped", file=sys.stderr)
        return 130
    run_time_s = time.monotonic() - started
    medians = {
        p: {c: median_stats(r) for c, r in by_c.items()} for p, by_c in results.stats.items()
    }
    cpu = {p: {c: median_cpu(r) for c, r in by_c.items()} for p, by_c in results.cpu.items()}
    ratio = {
        lv.concurrency: ratios(
            medians["immediate"][lv.concurrency], medians["echo"][lv.concurrency]
        )
        for lv in levels
    }
    meta = {
        "repeat": args.repeat,
        "warmup": args.warmup,
        "log_level": args.log_level.upper(),
        "profiled": args.profile is not None,
        "payload_bytes": results.payload_bytes,
        "postgres": results.postgres,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "loadavg_before": load_before,
    }
    print(render(medians, ratio, cpu, results, meta))
    print(
        "\npeak RSS (MiB, VmHWM at the end of the run): "
        + ", ".join(f"{name} {mb:.0f}" for name, mb in results.peak_rss_mb.items())
    )
    expected = args.repeat * sum(lv.requests for lv in levels) + sum(
        max(args.warmup, lv.concurrency) for lv in levels
    )
    rows = results.rows
    print(
        f"\nexecutions written: {rows['executions']} ({rows['succeeded']} succeeded, expected"
        f" {expected}); locks left held: {rows['locks_held']}"
    )
    document = {
        "benchmark": "immediate_latency",
        "finished_at": datetime.now(UTC).isoformat(),
        "sample": "client-observed wall time of one call; immediate: SubmitExecution "
        "(ExecutionClient.submit) api -> worker -> Postgres; echo: raw grpcio unary echo; "
        "postgres: asyncpg SELECT 1",
        "plan": "one noop step, action_class read, sla fast; name and target unique per request",
        **meta,
        "levels": [asdict(lv) for lv in levels],
        "median": {p: {str(c): asdict(s) for c, s in by_c.items()} for p, by_c in medians.items()},
        "ratio_immediate_over_echo": {str(c): r for c, r in ratio.items()},
        "cpu_ms_per_request": {p: {str(c): u for c, u in by_c.items()} for p, by_c in cpu.items()},
        "repetitions": {
            p: {str(c): [asdict(s) for s in reps] for c, reps in by_c.items()}
            for p, by_c in results.stats.items()
        },
        "rows": rows,
        "peak_rss_mb": results.peak_rss_mb,
        "run_time_s": round(run_time_s, 1),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(document, indent=2) + "\n")
    if args.profile is not None:
        write_profiles(args.profile)
    print(f"run time: {run_time_s:.1f} s; results written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
