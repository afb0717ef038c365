"""One soak run: stack up, workload and faults at once, settle, verdict, stack down.

Time budget (``minutes``): the stack's start-up counts; the workload and the fault schedule
share the first half of what is left; then the run waits (at most until 92 % of the budget)
for every execution to end, gives the reaper two passes to tidy up, and measures.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from opsconductor.lifecycle.storage.db import create_pool

from .faults import FaultDriver, build_schedule
from .stack import TENANTS, ChaosStack, remove_run_dir, start_stack
from .verdict import LockLeakSampler, Verdict, measure
from .workload import TERMINAL, WorkloadDriver, build_workload

_SETTLE_POLL_S = 1.0
_REAPER_PASSES_S = 5.0


@dataclass(frozen=True)
class SoakConfig:
    plans: int = 500
    seed: int = 1
    minutes: float = 9.0
    #: Where the verdict JSON goes (None: only printed).
    json_path: Path | None = None
    #: Keep the run's folder (logs, supervisor output) for a post-mortem.
    keep_run_dir: bool = False


async def _open_executions(stack: ChaosStack) -> int:
    conn = await asyncpg.connect(stack.database_url)
    try:
        count: int = await conn.fetchval(
            "SELECT count(*) FROM executions WHERE tenant_id = ANY($1) "
            "AND NOT (status::text = ANY($2::text[]))",
            list(TENANTS),
            sorted(TERMINAL),
        )
    finally:
        await conn.close()
    return count


async def _settle(stack: ChaosStack, until: float) -> None:
    """Wait for every execution to end (or the deadline), then for two reaper passes."""
    while time.monotonic() < until and await _open_executions(stack) > 0:
        await asyncio.sleep(_SETTLE_POLL_S)
    await asyncio.sleep(min(_REAPER_PASSES_S, max(0.0, until - time.monotonic())))


async def _attacks(
    driver: WorkloadDriver, count: int, seed: int, window_s: float, started: float
) -> None:
    rng = random.Random(f"attacks:{seed}")
    times = sorted(rng.uniform(0, window_s) for _ in range(count))
    for index, at in enumerate(times):
        await asyncio.sleep(max(0.0, started + at - time.monotonic()))
        victims = [
            eid for o in driver.outcomes if o.op.tenant == TENANTS[1] for eid in o.execution_ids
        ]
        await driver.attack(index, victims[0] if victims else None)


async def run_soak(config: SoakConfig, *, out: object = None) -> Verdict:
    """Run the soak and return its verdict (also written to ``config.json_path``)."""
    began = time.monotonic()
    budget_s = config.minutes * 60
    stack = await start_stack()
    faults = FaultDriver(stack)
    driver = WorkloadDriver(stack)
    verdict: Verdict | None = None
    try:
        pool = await create_pool(stack.database_url, min_size=1, max_size=2)
        attacks = max(4, config.plans // 50)
        try:
            for index in range(attacks):
                await stack.bind_intruder(pool, f"intruder-{index}")
        finally:
            await pool.close()
        started = time.monotonic()
        window_s = max(15.0, (budget_s - (started - began)) * 0.5)
        ops = build_workload(config.seed, config.plans, window_s)
        schedule = build_schedule(config.seed, window_s, stack.workers())
        sampler = LockLeakSampler(stack.database_url)
        sampling_done = asyncio.Event()
        sampling = asyncio.create_task(sampler.run(sampling_done))
        try:
            await asyncio.gather(
                driver.run(ops, started),
                faults.run(schedule, started),
                _attacks(driver, attacks, config.seed, window_s, started),
            )
            faults.resume_all()
            await _settle(stack, began + budget_s * 0.92)
        finally:
            sampling_done.set()
            await sampling
        verdict = await measure(
            stack,
            seed=config.seed,
            outcomes=driver.outcomes,
            attacks=driver.cross_tenant,
            fault_log=faults.log,
            leaked_locks=sampler.leaked,
        )
        verdict.figures["lock_leak_details"] = list(sampler.details.values())[:20]
        verdict.figures["schedule"] = [f.__dict__ for f in schedule]
        verdict.figures["run_dir"] = str(stack.run_dir)
        verdict.figures["elapsed_s"] = round(time.monotonic() - began, 1)
    finally:
        faults.resume_all()
        await driver.close()
        await stack.stop()
        # A failed verdict keeps the service logs: they are what the post-mortem needs.
        if not config.keep_run_dir and not (verdict is not None and verdict.failed()):
            remove_run_dir(stack)
    assert verdict is not None  # measure() ran, or the try raised
    if config.json_path is not None:
        config.json_path.parent.mkdir(parents=True, exist_ok=True)
        config.json_path.write_text(json.dumps(verdict.figures, indent=2, default=str))
    return verdict
