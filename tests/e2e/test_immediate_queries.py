"""Reading executions back (Get, List, Preview) and the rollout flags that gate submission.

Flags are global to the module's database: the flag tests restore them in ``finally`` and poll
for every change to take effect (the api caches flags for 2 s and drops the cache on NOTIFY).
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from opsc_test_actions import read_ledger

from opsconductor.client import Execution, ExecutionClient, FeatureDisabledError
from opsconductor.lifecycle.storage.flags import SYSTEM_TENANT

from . import inspection
from .conftest import Tenant
from .inspection import new_tenant, tenant_row_counts, wait_until
from .plans import plan, probe_step
from .stack import Stack

module_end_checks = inspection.module_end_checks
pytestmark = pytest.mark.usefixtures("module_end_checks")


def create_plan(
    ledger: Path | None = None, *, target: str = "srv-1", **params: Any
) -> dict[str, Any]:
    """A one-probe-step read plan; without ``ledger`` the probe records nothing."""
    step = probe_step("check", [target], ledger or Path("/nonexistent"), **params)
    if ledger is None:
        del step["params"]["ledger"]
    return plan(step)


async def test_list_pages_through_sixty_executions_without_gaps_or_duplicates(
    tenant: Tenant,
) -> None:
    """60 executions listed 25 at a time: pages of 25, 25 and 10, newest first, each exactly
    once; the status filter returns exactly the failed (or succeeded) ones, also paginated;
    the mode filter returns all of them as immediate and none as background."""
    # At most 10 in flight: the tenant's max_immediate quota (20 by default) refuses more.
    in_flight = asyncio.Semaphore(10)
    async with tenant.client("alice") as client:

        async def submit(i: int) -> Execution:
            async with in_flight:
                return await client.submit(
                    create_plan(target=f"srv-{i}", fail=i % 5 == 0), tenant_id=tenant.id
                )

        submitted = await asyncio.gather(*(submit(i) for i in range(60)))
        pages: list[list[Execution]] = []
        token_ = ""
        while True:
            page, token_ = await client.list_executions(
                tenant_id=tenant.id, page_size=25, page_token=token_
            )
            pages.append(page)
            if not token_:
                break
        failed = [
            e.execution_id
            async for e in client.iter_executions(
                tenant_id=tenant.id, statuses=["failed"], page_size=7
            )
        ]
        succeeded = [
            e.execution_id
            async for e in client.iter_executions(tenant_id=tenant.id, statuses=["succeeded"])
        ]
        immediate = [
            e async for e in client.iter_executions(tenant_id=tenant.id, execution_mode="immediate")
        ]
        background, _ = await client.list_executions(
            tenant_id=tenant.id, execution_mode="background"
        )

    assert [len(p) for p in pages] == [25, 25, 10]
    listed = [e.execution_id for p in pages for e in p]
    assert len(set(listed)) == 60
    assert set(listed) == {e.execution_id for e in submitted}
    stamps = [e.created_at for p in pages for e in p]
    assert all(a is not None and b is not None and a >= b for a, b in itertools.pairwise(stamps))
    expected_failed = {e.execution_id for e in submitted if e.status == "failed"}
    assert len(expected_failed) == 12
    assert sorted(failed) == sorted(expected_failed)
    assert len(failed) == len(set(failed))
    assert set(succeeded) == set(listed) - expected_failed
    assert len(immediate) == 60
    assert background == []


async def test_get_execution_returns_its_steps_in_plan_order(tenant: Tenant, ledger: Path) -> None:
    """GetExecution returns the execution with every step: ids in plan order, statuses,
    idempotency keys ``execution_id:step_id`` and results."""
    steps = [probe_step(f"step-{i}", ["srv-1"], ledger) for i in range(3)]
    async with tenant.client("alice") as client:
        done = await client.submit(plan(*steps), tenant_id=tenant.id)
        fetched = await client.get(done.execution_id, tenant_id=tenant.id)
    assert [s.step_id for s in fetched.steps] == ["step-0", "step-1", "step-2"]
    assert [s.position for s in fetched.steps] == [0, 1, 2]
    assert [s.status for s in fetched.steps] == ["succeeded"] * 3
    assert [s.idempotency_key for s in fetched.steps] == [
        f"{done.execution_id}:step-{i}" for i in range(3)
    ]
    assert all(s.result is not None and s.result.get("ok") for s in fetched.steps)
    assert fetched.steps == done.steps
    assert len(read_ledger(ledger)) == 3


async def test_preview_decides_like_submit_and_writes_nothing(
    tenant: Tenant, ledger: Path, e2e_pool: asyncpg.Pool
) -> None:
    """PreviewPlan reports mode immediate, approval level 0, policy fast_read, the action class
    and a plan hash equal to the one the submitted execution gets; it writes and runs nothing."""
    plan_ = plan(probe_step("check", ["srv-2", "srv-1"], ledger, hold_s=0.05))
    before = await tenant_row_counts(e2e_pool, tenant.id)
    async with tenant.client("alice") as client:
        preview = await client.preview(plan_, tenant_id=tenant.id)
        assert await tenant_row_counts(e2e_pool, tenant.id) == before
        assert read_ledger(ledger) == []
        done = await client.submit(plan_, tenant_id=tenant.id)
    assert preview.execution_mode == "immediate"
    assert preview.approval_level == 0
    assert preview.timeout_policy_id == "fast_read"
    assert preview.action_class == "read"
    assert preview.execution_timeout_ms == 10_000
    assert 50 <= preview.estimated_duration_ms < 10_000
    assert preview.plan_hash == done.plan_hash
    assert preview.idempotency_key == done.idempotency_key
    assert done.estimated_duration_ms == preview.estimated_duration_ms


@pytest.fixture
async def flags_admin(stack: Stack, e2e_pool: asyncpg.Pool) -> AsyncIterator[ExecutionClient]:
    """A client for a principal allowed to change the global flags (admin of ``_system``);
    the flags are put back to "everyone enabled, nobody record-only" afterwards."""
    actor = f"root-{secrets.token_hex(3)}"
    system = Tenant(id=SYSTEM_TENANT, stack=stack, pool=e2e_pool)
    await system.bind(actor, "admin")
    async with system.client(actor) as client:
        try:
            yield client
        finally:
            await client.update_feature_flags(
                stage_e_enabled=True,
                all_tenants_enabled=True,
                enabled_tenants=[],
                record_only_tenants=[],
            )


async def test_record_only_tenant_runs_succeed_without_side_effects(
    tenant: Tenant, tmp_path: Path, flags_admin: ExecutionClient
) -> None:
    """With the tenant in record_only_tenants, an execution succeeds marked record_only and its
    step reports what it would have done, while the probe's ledger stays empty."""
    flags = await flags_admin.update_feature_flags(record_only_tenants=[tenant.id])
    assert flags.record_only_tenants == (tenant.id,)
    async with tenant.client("alice") as client:

        async def record_only_run() -> tuple[Execution, Path] | None:
            ledger = tmp_path / f"ledger-{secrets.token_hex(4)}.jsonl"
            done = await client.submit(create_plan(ledger), tenant_id=tenant.id)
            return (done, ledger) if done.record_only else None

        done, ledger = await wait_until(record_only_run, within_s=10, what="record-only runs")
    assert done.status == "succeeded"
    assert done.steps[0].status == "succeeded"
    assert done.steps[0].result is not None
    assert done.steps[0].result["record_only"] is True
    assert read_ledger(ledger) == []


async def test_stage_e_disabled_for_a_tenant_refuses_its_submissions_only(
    tenant: Tenant, ledger: Path, stack: Stack, e2e_pool: asyncpg.Pool, flags_admin: ExecutionClient
) -> None:
    """With all_tenants_enabled false and only another tenant enabled, this tenant's submit is
    FAILED_PRECONDITION STAGE_E_DISABLED (FeatureDisabledError) with nothing written, the
    enabled tenant still runs, and re-enabling everyone lets this tenant run again."""
    enabled = await new_tenant(stack, e2e_pool)
    await flags_admin.update_feature_flags(all_tenants_enabled=False, enabled_tenants=[enabled.id])
    async with tenant.client("alice") as client:

        async def refused() -> FeatureDisabledError | None:
            before = await tenant_row_counts(e2e_pool, tenant.id)
            try:
                await client.submit(create_plan(), tenant_id=tenant.id)
            except FeatureDisabledError as error:
                assert await tenant_row_counts(e2e_pool, tenant.id) == before
                return error
            return None

        error = await wait_until(refused, within_s=10, what="stage E to be disabled")
        assert error.reason == "STAGE_E_DISABLED"
        async with enabled.client("alice") as other:
            still = await other.submit(create_plan(), tenant_id=enabled.id)
        assert still.status == "succeeded"
        with pytest.raises(FeatureDisabledError):
            await client.submit(create_plan(ledger), tenant_id=tenant.id)

        await flags_admin.update_feature_flags(all_tenants_enabled=True, enabled_tenants=[])

        async def runs_again() -> Execution | None:
            try:
                return await client.submit(create_plan(ledger), tenant_id=tenant.id)
            except FeatureDisabledError:
                return None

        again = await wait_until(runs_again, within_s=10, what="stage E to be re-enabled")
    assert again.status == "succeeded"
    assert len(read_ledger(ledger)) == 1
