"""ExecutionQueries (GetExecution, ListExecutions, CancelExecution) on the in-memory lifecycle:
each call authorized in the tenant first (a refusal audited, nothing read or changed), then one
call of the port; the cancel's initiator follows the caller's kind."""

from __future__ import annotations

from datetime import timedelta
from uuid import UUID, uuid4

import pytest

from opsconductor.api.logic.queries import ExecutionQueries
from opsconductor.common.auth import Principal
from opsconductor.common.errors import NotFoundError, PermissionDeniedError
from opsconductor.common.fsm import ExecutionStatus, StepStatus
from opsconductor.lifecycle.facade import ExecutionRecord
from opsconductor.lifecycle.fake import InMemoryLifecycle
from tests.unit.dlq_world import background_plan
from tests.unit.dlq_world import queued as world_queued
from tests.unit.roles_world import Roles

TENANT = "t1"
ALICE = Principal(actor_id="alice", tenant_id=TENANT)
VIEWER = Principal(actor_id="vera", tenant_id=TENANT)
BOT = Principal(actor_id="ci-bot", tenant_id=TENANT, auth_method="service")
OUTSIDER = Principal(actor_id="mallory", tenant_id="t2")


def world() -> tuple[ExecutionQueries, InMemoryLifecycle, Roles]:
    lifecycle = InMemoryLifecycle()
    roles = Roles(
        {
            (TENANT, "alice"): frozenset({"operator"}),
            (TENANT, "ci-bot"): frozenset({"operator"}),
            (TENANT, "vera"): frozenset({"viewer"}),
            ("t2", "mallory"): frozenset({"operator"}),
        },
        tier="api",
    )
    return ExecutionQueries(lifecycle=lifecycle, authorizer=roles), lifecycle, roles


async def execution(
    lifecycle: InMemoryLifecycle, *, tenant: str = TENANT, mode: str = "background"
) -> ExecutionRecord:
    new = background_plan(tenant, execution_mode=mode, steps=[("one", 0, "noop", "modify")])
    record, _ = await lifecycle.create(new, dedup_window=timedelta(hours=1))
    return record


async def queued(lifecycle: InMemoryLifecycle) -> tuple[ExecutionRecord, UUID]:
    return await world_queued(
        lifecycle, background_plan(TENANT, steps=[("one", 0, "noop", "modify")])
    )


async def test_get_reads_the_tenants_execution_and_hides_another_tenants() -> None:
    queries, lifecycle, roles = world()
    record = await execution(lifecycle)
    read = await queries.get(VIEWER, TENANT, str(record.id))
    assert (read.id, read.status, [s.step_id for s in read.steps]) == (
        record.id,
        ExecutionStatus.PENDING,
        ["one"],
    )
    other = await execution(lifecycle, tenant="t2")
    with pytest.raises(NotFoundError):
        await queries.get(ALICE, TENANT, str(other.id))
    with pytest.raises(NotFoundError):
        await queries.get(ALICE, TENANT, "not-a-uuid")
    with pytest.raises(PermissionDeniedError):
        await queries.get(OUTSIDER, TENANT, str(record.id))
    assert [r.payload.get("resource") for r in roles.audited] == ["ExecutionService/GetExecution"]


async def test_list_pages_with_the_default_size_and_filters() -> None:
    queries, lifecycle, _ = world()
    made = [await execution(lifecycle) for _ in range(3)]
    await execution(lifecycle, mode="immediate")
    await execution(lifecycle, tenant="t2")
    page, token = await queries.list(
        VIEWER, TENANT, statuses=(), mode="background", page_size=2, page_token=None
    )
    assert [r.id for r in page] == [made[2].id, made[1].id]
    rest, end = await queries.list(
        VIEWER, TENANT, statuses=(), mode="background", page_size=2, page_token=token
    )
    assert ([r.id for r in rest], end) == ([made[0].id], None)
    every, end = await queries.list(
        VIEWER, TENANT, statuses=(), mode=None, page_size=0, page_token=""
    )
    assert (len(every), end) == (4, None)  # 0: the default size; "" is no token
    with pytest.raises(PermissionDeniedError):
        await queries.list(OUTSIDER, TENANT, statuses=(), mode=None, page_size=0, page_token=None)


async def test_cancel_of_a_queued_execution_ends_it_and_drops_its_job() -> None:
    queries, lifecycle, _ = world()
    record, job_id = await queued(lifecycle)
    cancelled = await queries.cancel(ALICE, TENANT, str(record.id), "")
    assert cancelled.status is ExecutionStatus.CANCELLED
    assert (cancelled.cancelled_by, cancelled.cancel_reason) == ("alice", None)  # "" is none
    assert cancelled.cancel_initiator == "user"
    assert [s.status for s in cancelled.steps] == [StepStatus.SKIPPED]
    assert job_id not in lifecycle.jobs
    assert job_id not in lifecycle.queue


async def test_cancel_by_automation_is_system_initiated_and_a_running_one_awaits_its_worker() -> (
    None
):
    queries, lifecycle, _ = world()
    record, job_id = await queued(lifecycle)
    (job,) = await lifecycle.dequeue_batch("w1", 30.0, 1)
    await lifecycle.hand_off([job], worker_id="w1")
    requested = await queries.cancel(BOT, TENANT, str(record.id), "superseded")
    assert requested.status is ExecutionStatus.RUNNING
    assert (requested.cancel_initiator, requested.cancel_reason) == ("system", "superseded")
    assert lifecycle.jobs[job_id].state == "leased"  # its worker settles it


async def test_cancel_of_an_ended_execution_returns_it_unchanged() -> None:
    queries, lifecycle, _ = world()
    record, _ = await queued(lifecycle)
    first = await queries.cancel(ALICE, TENANT, str(record.id), "once")
    again = await queries.cancel(BOT, TENANT, str(record.id), "twice")
    assert again.status is ExecutionStatus.CANCELLED
    assert (again.cancelled_by, again.cancel_reason) == ("alice", "once")
    assert again.cancelled_at == first.cancelled_at


async def test_cancel_needs_the_cancel_permission_and_changes_nothing_when_refused() -> None:
    queries, lifecycle, roles = world()
    record, job_id = await queued(lifecycle)
    with pytest.raises(PermissionDeniedError):
        await queries.cancel(VIEWER, TENANT, str(record.id), "no")
    assert lifecycle.executions[record.id].status is ExecutionStatus.QUEUED
    assert job_id in lifecycle.jobs
    assert [r.payload.get("resource") for r in roles.audited] == [
        "ExecutionService/CancelExecution"
    ]
    with pytest.raises(NotFoundError):
        await queries.cancel(ALICE, TENANT, str(uuid4()), "unknown")
