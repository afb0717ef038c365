"""Spec §3.6: the immediate path enforces its SLA timeout policy itself.

A plan *estimated* short (so it is accepted as immediate) that really hangs 20 s must be cut
off at the fast policy's 10 s by the worker, recorded as timed out, and reported to the caller
as a timeout (a subclass of ``asyncio.TimeoutError``). Its own module: it takes 10 s, and its
failed step must not skew the observed durations other modules' plans are estimated with.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any
from uuid import UUID

import asyncpg
import pytest
from opsc_test_actions import read_ledger

from opsconductor.client import ExecutionClient, ExecutionContext, ExecutionTimeoutError
from opsconductor.lifecycle.storage.locks import check_lock_status

from . import inspection
from .conftest import Tenant, token
from .inspection import wait_until
from .plans import plan, probe_step

module_end_checks = inspection.module_end_checks
pytestmark = pytest.mark.usefixtures("module_end_checks")


def create_slow_plan(ledger: Path, duration: float, target: str = "db:primary") -> dict[str, Any]:
    """Estimated at 100 ms, so it runs immediately; really holds its target ``duration`` s."""
    return plan(probe_step("hang", [target], ledger, hold_s=duration, estimate_ms=100), sla="fast")


async def hang_up_early(tenant: Tenant, ledger: Path) -> None:
    """Submit a slow plan as a caller whose own deadline (1 s) ends long before the policy's."""
    impatient = ExecutionClient(tenant.stack.address("api"), token("alice", tenant.id), timeout=1)
    async with impatient:
        with pytest.raises(ExecutionTimeoutError):  # the caller's own DEADLINE_EXCEEDED
            await impatient.submit(
                create_slow_plan(ledger, duration=20, target="db:replica"), tenant_id=tenant.id
            )


async def test_spec_3_6_fast_sla_plan_hanging_20s_times_out_at_10s_and_is_recorded(
    tenant: Tenant, ledger: Path, e2e_pool: asyncpg.Pool, tmp_path: Path
) -> None:
    """§3.6: under the fast SLA (10 s) a plan hanging 20 s raises asyncio.TimeoutError
    (ExecutionTimeoutError) after about 10 s; the execution is failed with timed_out true and
    timeout_policy_id fast_read, its step failed, and its lock released. Meanwhile another such
    plan whose caller hung up after 1 s runs on to the same end in the worker (recorded, lock
    released, and — checked at module end — no error logged for the outcome nobody awaited)."""
    abandoned_ledger = tmp_path / "abandoned.jsonl"
    plan_ = create_slow_plan(ledger, duration=20)  # 20 seconds
    context = ExecutionContext(tenant_id=tenant.id)  # the plan's sla_class is fast: 10 s
    async with tenant.client("alice") as executor:
        assert (await executor.preview(plan_, tenant_id=tenant.id)).execution_mode == "immediate"
        started = time.monotonic()
        abandoned = asyncio.create_task(hang_up_early(tenant, abandoned_ledger))
        with pytest.raises(asyncio.TimeoutError) as timed_out:
            await executor.execute(plan_, context)
        elapsed = time.monotonic() - started
        await abandoned
        assert isinstance(timed_out.value, ExecutionTimeoutError)
        exec_id = str(timed_out.value.details["execution_id"])
        fetched = await executor.get(exec_id, tenant_id=tenant.id)

    assert 9.5 <= elapsed <= 12.5, f"returned after {elapsed:.1f} s, not at the 10 s policy"
    assert timed_out.value.details["timeout_policy_id"] == "fast_read"

    # Verify timeout recorded
    execution = await e2e_pool.fetchrow(
        "SELECT status::text, timed_out, timeout_policy_id, error_class FROM executions "
        "WHERE id = $1::uuid",
        exec_id,
    )
    assert execution is not None
    assert execution["timed_out"] is True
    assert execution["timeout_policy_id"] == "fast_read"
    assert execution["status"] == "failed"
    assert execution["error_class"] == "EXECUTION_TIMEOUT"

    assert (fetched.status, fetched.timed_out, fetched.tenant_id) == ("failed", True, tenant.id)
    assert [(s.status, s.error_class) for s in fetched.steps] == [("failed", "EXECUTION_TIMEOUT")]
    assert await check_lock_status(e2e_pool, tenant.id, "db:primary", "probe") is None
    lines = read_ledger(ledger)
    assert [line["outcome"] for line in lines] == ["interrupted"]
    held_s = (lines[0]["end_ns"] - lines[0]["start_ns"]) / 1e9
    assert held_s < 11, f"the step kept running {held_s:.1f} s, past the policy"

    async def abandoned_ended() -> asyncpg.Record | None:
        """The abandoned run's row once it is terminal and its lock is released (in that
        order: the final transition commits before the locks go)."""
        row = await e2e_pool.fetchrow(
            "SELECT status::text, timed_out FROM executions WHERE tenant_id = $1 AND id <> $2",
            tenant.id,
            UUID(exec_id),
        )
        if row is None or row["status"] != "failed":
            return None
        lock = await check_lock_status(e2e_pool, tenant.id, "db:replica", "probe")
        return row if lock is None else None

    row = await wait_until(abandoned_ended, within_s=5, what="the abandoned run to end")
    assert row["timed_out"] is True
    assert [line["outcome"] for line in read_ledger(abandoned_ledger)] == ["interrupted"]
