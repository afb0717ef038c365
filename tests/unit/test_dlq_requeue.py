"""requeue_dead_letter on the in-memory lifecycle: what it decides (may the entry be requeued, as
what) and that a refusal or a failure leaves everything as it was (the transaction rolled back).
The same flow on Postgres and Redis: tests/integration/test_consumer_retries.py."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta
from typing import Any
from uuid import UUID, uuid4

import pytest

from opsconductor.api.logic.dlq_requeue import (
    DLQ_REQUEUED_EVENT,
    RequeueResult,
    requeue_dead_letter,
)
from opsconductor.common.errors import (
    ConflictError,
    DeadLetterNotRequeueableError,
    DlqEntryRequeuedError,
    NotFoundError,
    QueueUnavailableError,
)
from opsconductor.common.fsm import ExecutionStatus
from opsconductor.lifecycle.facade import ExecutionRecord, NewExecution, TimeoutPolicy
from opsconductor.lifecycle.fake import InMemoryLifecycle
from tests.unit.dlq_world import background_plan
from tests.unit.dlq_world import dead_lettered as world_dead_lettered
from tests.unit.roles_world import MEDIUM_MODIFY

TENANT = "t1"
POLICIES = {MEDIUM_MODIFY.id: MEDIUM_MODIFY}


def plan(**changes: Any) -> NewExecution:
    return background_plan(TENANT, **changes)


async def dead_lettered(
    lifecycle: InMemoryLifecycle, new: NewExecution | None = None
) -> tuple[ExecutionRecord, UUID]:
    return await world_dead_lettered(lifecycle, new or plan())


async def requeue(
    lifecycle: InMemoryLifecycle,
    dlq_id: UUID,
    *,
    scope: str | None = None,
    record_only: bool | None = None,
    policies: dict[str, TimeoutPolicy] | None = None,
) -> RequeueResult:
    return await requeue_dead_letter(
        lifecycle,
        POLICIES if policies is None else policies,
        dlq_id=dlq_id,
        by="root",
        tenant_scope=scope,
        request_id="req-requeue",
        record_only=record_only,
        dedup_window=timedelta(hours=24),
    )


def untouched(lifecycle: InMemoryLifecycle, old: ExecutionRecord, dlq_id: UUID) -> None:
    """A refused or failed requeue left everything as it was."""
    assert lifecycle.dlq[old.id].id == dlq_id
    assert lifecycle.dlq[old.id].requeued_at is None
    assert not lifecycle.executions[old.id].key_retired
    assert lifecycle.executions[old.id].status is ExecutionStatus.FAILED
    assert lifecycle.jobs == {}


async def test_a_requeue_queues_a_new_execution_of_the_frozen_plan_and_marks_the_entry() -> None:
    lifecycle = InMemoryLifecycle()
    old, dlq_id = await dead_lettered(lifecycle, plan(record_only=True))
    result = await requeue(lifecycle, dlq_id)
    new = result.execution
    assert new.id != old.id
    assert (new.status, new.execution_mode, new.request_id) == (
        ExecutionStatus.QUEUED,
        "background",
        "req-requeue",
    )
    assert (new.idempotency_key, new.plan_hash, new.plan_snapshot, new.priority) == (
        old.idempotency_key,
        old.plan_hash,
        old.plan_snapshot,
        old.priority,
    )
    assert new.record_only  # None keeps the old execution's setting
    assert [s.step_id for s in new.steps] == ["one", "two"]
    assert lifecycle.jobs[result.job_id].max_attempts == MEDIUM_MODIFY.max_attempts
    assert (result.entry.id, result.entry.requeued_by) == (dlq_id, "root")
    assert lifecycle.executions[old.id].key_retired
    assert lifecycle.executions[old.id].status is ExecutionStatus.FAILED
    assert lifecycle.dlq == {}
    assert lifecycle.executions[new.id].events == [DLQ_REQUEUED_EVENT]
    assert lifecycle.executions[new.id].dlq_requeued == {
        "dlq_id": str(dlq_id),
        "requeued_from": str(old.id),
        "requeued_by": "root",
        "job_id": str(result.job_id),
        "max_attempts": MEDIUM_MODIFY.max_attempts,
        "previous_attempts": 1,
        "previous_error_class": "ACTION_FAILED",
        "request_id": "req-requeue",
    }
    with pytest.raises(DlqEntryRequeuedError, match=f"as execution {new.id}"):
        await requeue(lifecycle, dlq_id)


async def test_record_only_given_overrides_the_old_executions() -> None:
    lifecycle = InMemoryLifecycle()
    _, dlq_id = await dead_lettered(lifecycle, plan(record_only=True))
    result = await requeue(lifecycle, dlq_id, record_only=False)
    assert not result.execution.record_only


async def test_another_tenants_entry_is_not_found_and_untouched() -> None:
    lifecycle = InMemoryLifecycle()
    old, dlq_id = await dead_lettered(lifecycle)
    with pytest.raises(NotFoundError):
        await requeue(lifecycle, dlq_id, scope="t2")
    with pytest.raises(NotFoundError):
        await requeue(lifecycle, uuid4())
    untouched(lifecycle, old, dlq_id)
    assert (await requeue(lifecycle, dlq_id, scope=TENANT)).entry.id == dlq_id


@pytest.mark.parametrize(
    ("approval_level", "policies", "message"),
    [
        (1, None, "needed approval level 1"),
        (0, {}, "no longer exists"),
    ],
)
async def test_an_approved_plan_or_a_vanished_policy_is_refused_and_untouched(
    approval_level: int, policies: dict[str, TimeoutPolicy] | None, message: str
) -> None:
    lifecycle = InMemoryLifecycle()
    old, dlq_id = await dead_lettered(lifecycle, plan(approval_level=approval_level))
    with pytest.raises(DeadLetterNotRequeueableError, match=message):
        await requeue(lifecycle, dlq_id, policies=policies)
    untouched(lifecycle, old, dlq_id)


async def test_an_execution_not_ended_is_refused() -> None:
    lifecycle = InMemoryLifecycle()
    old, dlq_id = await dead_lettered(lifecycle)
    lifecycle.executions[old.id].status = ExecutionStatus.RUNNING  # an entry gone astray
    with pytest.raises(DeadLetterNotRequeueableError, match="still running"):
        await requeue(lifecycle, dlq_id)
    assert lifecycle.dlq[old.id].requeued_at is None
    assert not lifecycle.executions[old.id].key_retired


async def test_a_live_execution_holding_the_key_is_a_conflict_and_the_retire_is_undone() -> None:
    lifecycle = InMemoryLifecycle()
    old, dlq_id = await dead_lettered(lifecycle)
    # The plan was submitted again meanwhile: its new execution holds the key.
    assert await lifecycle.retire_key(old.id)
    live, created = await lifecycle.create(
        replace(plan(), idempotency_key=old.idempotency_key), dedup_window=timedelta(hours=1)
    )
    assert created
    with pytest.raises(ConflictError, match=str(live.id)):
        await requeue(lifecycle, dlq_id)
    assert lifecycle.dlq[old.id].requeued_at is None
    assert set(lifecycle.records) == {old.id, live.id}  # nothing created
    assert lifecycle.executions[live.id].status is ExecutionStatus.PENDING
    assert not lifecycle.executions[live.id].key_retired


async def test_a_queue_down_or_missing_rolls_everything_back() -> None:
    lifecycle = InMemoryLifecycle()
    old, dlq_id = await dead_lettered(lifecycle)
    lifecycle.queue_up = False
    with pytest.raises(QueueUnavailableError):
        await requeue(lifecycle, dlq_id)
    untouched(lifecycle, old, dlq_id)
    assert list(lifecycle.records) == [old.id]
    none = InMemoryLifecycle(queue_configured=False)
    with pytest.raises(QueueUnavailableError):
        await requeue(none, dlq_id)
