"""Idempotency and the per-asset mutex under real concurrency (spec §3.1, §3.2).

Side effects are counted by the ``probe`` test action: one ledger line per call, and a marker
file per held target that makes a second simultaneous holder fail with ``PROBE_OVERLAP``.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from opsc_test_actions import read_ledger

from opsconductor.client import Execution, ExecutionContext, ResourceBusyError
from opsconductor.lifecycle.storage.locks import check_lock_status, lock_key

from . import inspection
from .conftest import Tenant
from .inspection import wait_until
from .plans import plan, probe_step

module_end_checks = inspection.module_end_checks
pytestmark = pytest.mark.usefixtures("module_end_checks")

TARGETS = [f"node-{i:02d}" for i in range(5)]
#: Generous: 20 plans of at most 3 × 0.2 s each finish in about a second when nothing deadlocks.
BATCH_BOUND_S = 20.0
#: A refused plan is resubmitted for this long, so each target has many successive holders.
RETRY_FOR_S = 2.0


def create_probe_plan(ledger: Path, target: str, **params: Any) -> dict[str, Any]:
    """A one-step read plan holding ``target`` (a stand-in for the spec's restart plan)."""
    return plan(probe_step("restart", [target], ledger, **params))


async def test_spec_3_2_second_plan_on_a_held_target_fails_fast_and_runs_once_it_is_free(
    tenant: Tenant, ledger: Path, e2e_pool: asyncpg.Pool
) -> None:
    """§3.2: while plan1 holds server-01, a different plan2 on the same target and action fails
    at once with ResourceBusyError naming the holder, runs nothing, and leaves no lock behind;
    once plan1 has finished, submitting plan2 again runs it (its failed attempt's key was
    retired)."""
    plan1 = create_probe_plan(ledger, "server-01", hold_s=2.0)
    plan2 = create_probe_plan(ledger, "server-01")
    context = ExecutionContext(tenant_id=tenant.id)
    async with tenant.client("alice") as executor:
        # Start first execution
        exec1_task = asyncio.create_task(executor.execute(plan1, context))
        held = await wait_until(
            lambda: check_lock_status(e2e_pool, tenant.id, "server-01", "probe"),
            within_s=5,
            what="plan1 to hold server-01",
        )

        # Try second execution (should fail)
        started = time.monotonic()
        with pytest.raises(ResourceBusyError) as busy:
            await executor.execute(plan2, context)
        refused_in = time.monotonic() - started
        assert not exec1_task.done(), "plan1 ended before plan2 was tried: the test proves nothing"

        exec1 = await exec1_task
        failed, _ = await executor.list_executions(tenant_id=tenant.id, statuses=["failed"])
        retried = await executor.execute(plan2, context)

    assert refused_in < 1.0, f"plan2 waited {refused_in:.2f} s for the lock instead of failing"
    assert busy.value.reason == "RESOURCE_BUSY"
    assert busy.value.details["lock_key"] == lock_key(tenant.id, "server-01", "probe")
    assert busy.value.details["held_by_execution_id"] == exec1.execution_id
    assert str(held.owner_execution_id) == exec1.execution_id
    assert exec1.status == "succeeded"

    assert len(failed) == 1
    refused = failed[0]
    assert refused.error_class == "RESOURCE_BUSY"
    assert refused.execution_id not in {exec1.execution_id, retried.execution_id}
    assert retried.status == "succeeded"
    assert not retried.deduplicated
    assert retried.plan_hash == refused.plan_hash
    retired_at = await e2e_pool.fetchval(
        "SELECT idempotency_retired_at FROM executions WHERE id = $1::uuid",
        refused.execution_id,
    )
    assert retired_at is not None

    lines = read_ledger(ledger)
    assert sorted(line["execution_id"] for line in lines) == sorted(
        [exec1.execution_id, retried.execution_id]
    ), "the refused attempt ran its step"
    assert await check_lock_status(e2e_pool, tenant.id, "server-01", "probe") is None


async def test_fifty_concurrent_identical_submissions_make_one_execution_and_one_side_effect(
    tenant: Tenant, ledger: Path, e2e_pool: asyncpg.Pool
) -> None:
    """50 identical submissions racing (each on its own channel) all get the same execution id
    and its final, succeeded state; one executions row exists for the key and the action ran
    once."""
    plan_ = plan(probe_step("count", ["db:primary"], ledger, hold_s=0.3))

    async def submit() -> Execution:
        async with tenant.client("alice") as client:
            return await client.submit(plan_, tenant_id=tenant.id)

    results = await asyncio.wait_for(asyncio.gather(*(submit() for _ in range(50))), timeout=30)

    assert len({r.execution_id for r in results}) == 1
    assert [r.status for r in results] == ["succeeded"] * 50
    assert sorted(r.deduplicated for r in results) == [False] + [True] * 49
    rows = await e2e_pool.fetch(
        "SELECT id FROM executions WHERE tenant_id = $1 AND idempotency_key = $2",
        tenant.id,
        results[0].idempotency_key,
    )
    assert len(rows) == 1
    assert (
        await e2e_pool.fetchval("SELECT count(*) FROM executions WHERE tenant_id = $1", tenant.id)
        == 1
    )
    lines = read_ledger(ledger)
    assert len(lines) == 1
    assert lines[0]["outcome"] == "ok"


def random_plan(rng: random.Random, ledger: Path) -> dict[str, Any]:
    """2-3 probe steps, each over a random, shuffled subset of the shared targets."""
    steps = [
        probe_step(f"s{i}", rng.sample(TARGETS, rng.randint(1, 2)), ledger, hold_s=0.2)
        for i in range(rng.randint(2, 3))
    ]
    return plan(*steps)


def _overlaps(lines: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """Pairs of ledger lines (by execution) that held the same target at the same time."""
    by_target: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for line in lines:
        for target in line["targets"]:
            by_target[target].append(line)
    found = []
    for target, held in by_target.items():
        held.sort(key=lambda line: line["start_ns"])
        for before, after in itertools.pairwise(held):
            if after["start_ns"] < before["end_ns"]:
                found.append((target, before["execution_id"], after["execution_id"]))
    return found


@pytest.mark.parametrize("batch", range(3))
async def test_twenty_plans_over_overlapping_targets_never_deadlock_or_overlap(
    batch: int, tenant: Tenant, ledger: Path, e2e_pool: asyncpg.Pool
) -> None:
    """20 plans racing over 5 shared targets, in different orders: all return within the bound
    (no deadlock), each either succeeds or is refused with ResourceBusyError, no target ever
    had two holders (probe markers and ledger intervals), and no lock is left afterwards."""
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    plans = [random_plan(rng, ledger) for _ in range(20)]

    async def submit(plan_: dict[str, Any]) -> Execution | ResourceBusyError:
        """Submit; on ResourceBusyError retry a few times, so targets change hands often."""
        async with tenant.client("alice") as client:
            while True:
                try:
                    return await client.submit(plan_, tenant_id=tenant.id)
                except ResourceBusyError as busy:
                    if time.monotonic() > retry_until:
                        return busy
                    await asyncio.sleep(rng.uniform(0.02, 0.1))  # retry pacing, not a wait

    started = time.monotonic()
    retry_until = started + RETRY_FOR_S
    results = await asyncio.wait_for(
        asyncio.gather(*(submit(p) for p in plans)), timeout=BATCH_BOUND_S
    )
    elapsed = time.monotonic() - started

    done = [r for r in results if isinstance(r, Execution)]
    busy = [r for r in results if isinstance(r, ResourceBusyError)]
    assert len(done) + len(busy) == 20, f"seed {seed}"
    assert done, f"seed {seed}: every plan was refused"
    failures = [(r.status, r.error_class) for r in done if r.status != "succeeded"]
    assert not failures, f"seed {seed}: {failures}"
    step_errors = [s.error_class for r in done for s in r.steps if s.error_class]
    assert "PROBE_OVERLAP" not in step_errors, f"seed {seed}"

    lines = read_ledger(ledger)
    assert [line for line in lines if line["outcome"] != "ok"] == [], f"seed {seed}"
    assert _overlaps(lines) == [], f"seed {seed}: two holders of one target"
    ran = {line["execution_id"] for line in lines}
    assert ran == {r.execution_id for r in done}, f"seed {seed}: a refused plan ran a step"
    assert len(lines) == sum(len(r.steps) for r in done)

    locks = await e2e_pool.fetchval(
        "SELECT count(*) FROM execution_locks WHERE tenant_id = $1", tenant.id
    )
    assert locks == 0, f"seed {seed}: locks left behind"
    # Every refused attempt ended failed with its key retired (that is what lets it retry).
    rows = await e2e_pool.fetch(
        "SELECT status::text, error_class, idempotency_retired_at IS NOT NULL AS retired "
        "FROM executions WHERE tenant_id = $1",
        tenant.id,
    )
    outcomes = sorted({(r["status"], r["error_class"], r["retired"]) for r in rows}, key=str)
    assert set(outcomes) <= {("succeeded", None, False), ("failed", "RESOURCE_BUSY", True)}
    assert sum(r["status"] == "succeeded" for r in rows) == len(done), f"seed {seed}"
    assert sum(r["status"] == "failed" for r in rows) >= len(busy), f"seed {seed}"
    assert elapsed < BATCH_BOUND_S
