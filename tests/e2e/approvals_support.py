"""What the approvals e2e modules share: the stack (api, worker, approvals service, real Redis),
approvers, plans per approval level, and polls for statuses and requests.

A module adopts the stack with ``stack = approvals_support.approvals_stack``. Every tenant of
these modules gets two approvers, ``bob`` and ``carol`` (role ``approver``: they may decide but
not submit), besides the ``tenant`` fixture's alice (operator), dave (deployer), vera (viewer)
and ada (admin). Approval levels up to 3 are enabled for the module's database.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from opsconductor.client import Approval, ApprovalClient, Execution, ExecutionClient
from opsconductor.lifecycle.storage.flags import update_flags

from .conftest import Tenant, running_stack
from .inspection import wait_until
from .plans import plan, probe_step
from .stack import Stack

RUNBOOK = "https://runbooks.example.com/deploy"


@pytest.fixture(scope="module")
async def approvals_stack(
    e2e_dsn: str, e2e_pool: asyncpg.Pool, redis_url: str
) -> AsyncIterator[Stack]:
    """api, worker and approvals service on the module's database, with a real Redis (level 3
    and approved background plans run from the queue) and approval levels 1-3 enabled."""
    await update_flags(e2e_pool, {"max_approval_level": 3}, by="e2e")
    async with running_stack(
        e2e_dsn, redis_url, with_approvals=True, OPSC_CONSUMER_POLL_INTERVAL_S="0.05"
    ) as running:
        yield running


async def with_approvers(tenant: Tenant) -> Tenant:
    """``tenant`` with bob and carol bound as approvers."""
    for actor in ("bob", "carol"):
        await tenant.bind(actor, "approver")
    return tenant


def modify_plan(ledger: Path, *, target: str = "svc-1", hold_s: float = 0.05) -> dict[str, Any]:
    """Level 1 (confirmation): one probe step of class modify, short enough to run immediately."""
    return plan(probe_step("restart", [target], ledger, action_class="modify", hold_s=hold_s))


def deploy_plan(ledger: Path, *, runbook: str | None = RUNBOOK) -> dict[str, Any]:
    """Level 2 (plan review): a deploy step; a runbook URL unless ``runbook`` is None."""
    extra = {"runbook_url": runbook} if runbook else {}
    return plan(
        probe_step("deploy", ["web-1", "web-2"], ledger, action_class="deploy", hold_s=0.05),
        sla="medium",
        description="roll out v2",
        **extra,
    )


def production_plan(ledger: Path, *, steps: int = 3, target: str = "prod-db") -> dict[str, Any]:
    """Level 3 (step by step): ``steps`` modify steps s1..sN on a target tagged env=production."""
    built = [
        probe_step(f"s{i}", [], ledger, action_class="modify", hold_s=0.05)
        for i in range(1, steps + 1)
    ]
    for step in built:
        step["targets"] = [{"ref": target, "tags": {"env": "production"}}]
    return plan(*built, name=f"prod-{secrets.token_hex(4)}", runbook_url=RUNBOOK)


async def wait_status(
    client: ExecutionClient, execution: Execution, *statuses: str, within_s: float = 30.0
) -> Execution:
    """Poll the execution until its status is one of ``statuses``; fail after ``within_s``."""

    async def reached() -> Execution | None:
        current = await client.get(execution.execution_id, tenant_id=execution.tenant_id)
        return current if current.status in statuses else None

    return await wait_until(reached, within_s=within_s, what=f"status in {statuses}")


async def wait_step_request(
    approvals: ApprovalClient, execution: Execution, step_id: str, within_s: float = 30.0
) -> Approval:
    """Poll the pending requests until the one for ``step_id`` of ``execution`` is open."""

    async def opened() -> Approval | None:
        pending, _ = await approvals.list_pending_approvals(tenant_id=execution.tenant_id)
        for approval in pending:
            if approval.execution_id == execution.execution_id and approval.step_id == step_id:
                return approval
        return None

    return await wait_until(opened, within_s=within_s, what=f"a request for step {step_id}")


async def event_types(pool: asyncpg.Pool, execution_id: str) -> list[str]:
    """The execution's event types in order."""
    rows = await pool.fetch(
        "SELECT type FROM execution_events WHERE execution_id = $1::uuid ORDER BY seq",
        execution_id,
    )
    return [row["type"] for row in rows]


class Stopwatch:
    """Wall time since creation, for "returns at once" assertions."""

    def __init__(self) -> None:
        self._started = time.monotonic()

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self._started
