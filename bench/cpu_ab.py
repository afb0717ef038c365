"""CPU milliseconds per execution of api, worker and Postgres for code variants, side by side.

``make bench-cpu-ab`` or ``.venv/bin/python bench/cpu_ab.py --help``.

On a shared machine latency and throughput follow the load average more than the code, and even
CPU time per execution drifts with it (caches, frequency, other processes on the same core). To
compare two versions of the code, this runs one stack per *variant* (``_stack.py``: its own
database on one Postgres, its own worker and api processes) at the same time and alternates
closed-loop batches between them (the order reversed every round), so both see the same
machine; each batch reads the user+system CPU time of the variant's api, worker and Postgres
backends from ``/proc`` (``_measure.CpuMeter``) and divides it by the executions of the batch.
The table shows each variant's medians over the rounds.

A variant is ``NAME`` or ``NAME:VAR=VALUE,VAR=VALUE``: environment for its api and worker, e.g.
``PYTHONPATH=<the src folders of another checkout>`` (the services then import that code: see
``--tree``) or ``OPSC_LOG_LEVEL=WARNING``. ``--tree NAME=DIR`` is shorthand for the PYTHONPATH of
the checkout in DIR (``git worktree add /tmp/base main``, or ``git archive REV | tar -x -C DIR``).

Modes: ``immediate`` (one-step ``noop`` plans through ``ExecutionClient.submit``, each answer
checked ``succeeded``) and ``background`` (submitted ``requested_mode=background``, the batch
ends when every job of it has ``succeeded``; each stack has a queue, embedded Redis unless
``REDIS_URL`` is set). Postgres: ``DATABASE_URL``'s server, else one embedded for all stacks.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import statistics
import sys
import time
from collections.abc import Sequence
from contextlib import AsyncExitStack
from pathlib import Path

import asyncpg
from _measure import OTHER, Call, CpuMeter, closed_loop
from _stack import BenchStack, noop_plan

from opsconductor.client import ExecutionClient

GROUPS = ("api", "worker", "postgres")


def parse_variant(spec: str) -> tuple[str, dict[str, str]]:
    name, _, assignments = spec.partition(":")
    env = dict(item.split("=", 1) for item in assignments.split(",") if item)
    return name, env


def tree_pythonpath(directory: Path) -> str:
    """The ``src`` folders of every distribution of the checkout in ``directory``."""
    folders = sorted(directory.glob("libs/*/src")) + sorted(directory.glob("services/*/src"))
    if not folders:
        raise SystemExit(f"no libs/*/src or services/*/src under {directory}")
    return os.pathsep.join(str(f) for f in folders)


class Variant:
    def __init__(self, name: str, stack: BenchStack, client: ExecutionClient) -> None:
        self.name = name
        self.stack = stack
        self.client = client
        self.conn: asyncpg.Connection | None = None
        self.meter: CpuMeter | None = None
        self.cpu: list[dict[str, float]] = []
        self.rates: list[float] = []

    async def open(self) -> None:
        self.conn = await asyncpg.connect(self.stack.dsn)
        services = self.stack.services
        self.meter = CpuMeter(
            GROUPS,
            {"api": [services["api"].process.pid], "worker": [services["worker"].process.pid]},
            self._backends,
        )

    async def _backends(self) -> dict[str, list[int]]:
        assert self.conn is not None
        return {"postgres": await self.stack.backend_pids(self.conn)}

    def call(self, mode: str, label: str, n: int, done: list[str]) -> Call:
        plans = [noop_plan(f"ab-{label}-{i}", f"ab:{label}:{i}") for i in range(n)]
        tenant = self.stack.tenant_id

        async def call(i: int) -> None:
            if mode == "immediate":
                execution = await self.client.submit(plans[i], tenant_id=tenant)
                if execution.status != "succeeded":
                    raise SystemExit(f"{self.name}: {execution.status} {execution.error_class}")
            else:
                execution = await self.client.submit(
                    plans[i], tenant_id=tenant, requested_mode="background"
                )
                done.append(str(execution.execution_id))

        return call

    async def _wait_done(self, ids: Sequence[str], within_s: float) -> None:
        """Until every job of the batch succeeded (another end, or none in time: the run fails)."""
        assert self.conn is not None
        deadline = time.monotonic() + within_s
        while True:
            rows = await self.conn.fetch(
                "SELECT status::text AS status, count(*) AS n FROM executions"
                " WHERE id = ANY($1::uuid[]) GROUP BY status",
                list(ids),
            )
            counts = {row["status"]: int(row["n"]) for row in rows}
            if counts.get("succeeded", 0) == len(ids):
                return
            ended = {s: k for s, k in counts.items() if s in ("failed", "cancelled", "rejected")}
            if ended or time.monotonic() > deadline:
                raise SystemExit(f"{self.name}: jobs not all succeeded: {counts}")
            await asyncio.sleep(0.05)

    async def batch(self, mode: str, label: str, n: int, concurrency: int) -> tuple[float, float]:
        ids: list[str] = []
        started = time.perf_counter()
        await closed_loop(self.call(mode, label, n, ids), n, concurrency)
        if mode == "background":
            await self._wait_done(ids, within_s=300.0)
        return time.perf_counter() - started, float(n)


async def run(args: argparse.Namespace, variants: Sequence[tuple[str, dict[str, str]]]) -> str:
    async with AsyncExitStack() as stack_of:
        admin = os.environ.get("DATABASE_URL") or None
        running: list[Variant] = []
        # Every process is started before the first gRPC call of this one (see _stack.py).
        stacks: list[tuple[str, BenchStack]] = []
        for name, env in variants:
            service_env = {"OPSC_DB_POOL_SIZE": str(args.pool), **env}
            worker_env = dict(service_env)
            if args.mode == "background":
                worker_env.setdefault("OPSC_CONSUMER_CONCURRENCY", "8")
            bench = BenchStack(
                server_dsn=admin,
                log_level=args.log_level,
                api_env=service_env,
                worker_env=worker_env,
                with_redis=args.mode == "background",
                redis_url=os.environ.get("REDIS_URL") or None,
            )
            await stack_of.enter_async_context(bench)
            admin = admin or bench._admin_dsn  # the next stacks share this Postgres
            stacks.append((name, bench))
        for name, bench in stacks:
            client = await stack_of.enter_async_context(
                ExecutionClient(bench.address("api"), bench.token())
            )
            variant = Variant(name, bench, client)
            await variant.open()
            assert variant.conn is not None
            stack_of.push_async_callback(variant.conn.close)
            running.append(variant)
        run_id = secrets.token_hex(3)
        for variant in running:
            await variant.batch(args.mode, f"{run_id}-warm", max(50, args.concurrency), 8)
        for r in range(args.rounds):
            order = running if r % 2 == 0 else running[::-1]
            for variant in order:
                assert variant.meter is not None
                before = await variant.meter.snapshot()
                wall, n = await variant.batch(
                    args.mode, f"{run_id}-{r}", args.requests, args.concurrency
                )
                after = await variant.meter.snapshot()
                variant.cpu.append(variant.meter.per_request_ms(before, after, int(n)))
                variant.rates.append(n / wall)
                print(
                    f"  round {r + 1}/{args.rounds} {variant.name}: "
                    + " ".join(f"{g} {variant.cpu[-1][g]:.2f}" for g in (*GROUPS, OTHER)),
                    file=sys.stderr,
                    flush=True,
                )
    lines = [
        f"{args.mode}, concurrency {args.concurrency}, {args.rounds} rounds of "
        f"{args.requests} per variant, services at {args.log_level}; "
        f"load average now {os.getloadavg()[0]:.1f}",
        "CPU ms per execution (medians over the rounds); other: the rest of the machine",
        f"{'variant':<12}" + "".join(f"{g:>9}" for g in (*GROUPS, "total", OTHER)) + "   exec/s",
    ]
    for variant in running:
        med = {g: statistics.median(c[g] for c in variant.cpu) for g in (*GROUPS, OTHER)}
        total = sum(med[g] for g in GROUPS)
        lines.append(
            f"{variant.name:<12}"
            + "".join(f"{med[g]:>9.2f}" for g in GROUPS)
            + f"{total:>9.2f}{med[OTHER]:>9.2f}{statistics.median(variant.rates):>9.1f}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("variants", nargs="*", help="NAME or NAME:VAR=VALUE,... (see --help)")
    parser.add_argument("--tree", action="append", default=[], help="NAME=DIR: another checkout")
    parser.add_argument("--mode", choices=("immediate", "background"), default="immediate")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--requests", type=int, default=300, help="executions per batch")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--pool", type=int, default=12, help="OPSC_DB_POOL_SIZE per service")
    args = parser.parse_args(argv)
    variants = [parse_variant(v) for v in args.variants]
    for spec in args.tree:
        name, _, folder = spec.partition("=")
        variants.append((name, {"PYTHONPATH": tree_pythonpath(Path(folder))}))
    if not variants:
        variants = [("this", {})]
    print(asyncio.run(run(args, variants)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
