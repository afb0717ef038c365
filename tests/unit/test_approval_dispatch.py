"""The approvals service's dispatcher against the in-memory lifecycle (no Postgres, no Redis):
what it queues for an approved background execution, what it refuses, and how an approved
immediate execution no worker could start ends. The lifecycle's own behaviours are checked
against the real core in tests/integration/test_lifecycle_facade.py."""

from __future__ import annotations

from datetime import UTC, datetime
from uuid import UUID, uuid4

import pytest

from opsconductor.approvals.logic.dispatch import ExecutionDispatcher
from opsconductor.common.errors import (
    ConflictError,
    FSMError,
    QueueUnavailableError,
    ResourceBusyError,
    WorkerUnavailableError,
)
from opsconductor.common.fsm import ExecutionStatus
from opsconductor.lifecycle.fake import InMemoryLifecycle
from opsconductor.lifecycle.storage.execution_records import ExecutionRecord
from opsconductor.lifecycle.storage.policies import TimeoutPolicy

POLICY = TimeoutPolicy(
    id="fast_read",
    sla_class="fast",
    action_class="read",
    step_timeout_ms=5_000,
    execution_timeout_ms=10_000,
    max_attempts=3,
    max_lease_renewals=4,
    lease_buffer_ms=1_000,
)


def record(status: ExecutionStatus, *, policy: str | None = "fast_read") -> ExecutionRecord:
    now = datetime.now(UTC)
    return ExecutionRecord(
        id=uuid4(),
        tenant_id="t1",
        actor_id="alice",
        request_id="req-1",
        idempotency_key="k" * 64,
        idempotency_retired_at=None,
        plan_hash="a" * 64,
        plan_snapshot={"name": "p"},
        plan_snapshot_hash="b" * 64,
        status=status,
        execution_mode="background",
        sla_class="fast",
        action_class="read",
        approval_level=1,
        approval_id=None,
        priority=50,
        timeout_policy_id=policy,
        timeout_ms=10_000,
        timed_out=False,
        estimated_duration_ms=None,
        deadline_at=None,
        record_only=False,
        attempts=0,
        created_at=now,
        started_at=None,
        ended_at=None,
        updated_at=now,
        cancelled_by=None,
        cancelled_at=None,
        cancel_reason=None,
        result_summary=None,
        error_class=None,
        error_message=None,
        worker_id=None,
        lease_renewals=0,
        cancel_checks_performed=0,
        last_transition_at=None,
        last_transition_by=None,
        last_transition_from=None,
        lease_token=None,
        event_seq=1,
        trace_context="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    )


class Worker:
    """The worker port: answers, or raises what a real worker client would."""

    def __init__(self, error: Exception | None = None) -> None:
        self.error = error
        self.calls: list[UUID] = []

    async def run_immediate(
        self, *, tenant_id: str, execution_id: UUID, token: str, timeout_s: float
    ) -> object:
        self.calls.append(execution_id)
        if self.error is not None:
            raise self.error
        return object()


def dispatcher(lifecycle: InMemoryLifecycle, worker: Worker | None = None) -> ExecutionDispatcher:
    return ExecutionDispatcher(
        lifecycle=lifecycle,
        worker=worker or Worker(),
        policies={"fast_read": POLICY},
        margin_s=1.0,
    )


async def test_an_approved_background_execution_is_queued_with_its_policys_budget() -> None:
    core = InMemoryLifecycle()
    approved = core.add(record(ExecutionStatus.AWAITING_APPROVAL))
    job_id = await dispatcher(core).enqueue(None, approved, by="bob")
    execution = core.executions[approved.id]
    assert execution.status is ExecutionStatus.QUEUED
    assert execution.transitions == [(ExecutionStatus.QUEUED, "bob", {"reason": "approved"})]
    job = core.jobs[job_id]
    assert (job.execution_id, job.max_attempts, job.max_lease_renewals) == (approved.id, 3, 4)
    # The released job logs as the request that created the execution.
    assert job.request_id == "req-1"
    assert job.trace_context == approved.trace_context


async def test_a_release_is_refused_without_a_queue_or_a_policy_and_queues_nothing() -> None:
    unqueued = InMemoryLifecycle(queue_configured=False)
    approved = unqueued.add(record(ExecutionStatus.AWAITING_APPROVAL, policy=None))
    # No queue is the first refusal, whatever else is wrong.
    with pytest.raises(QueueUnavailableError):
        await dispatcher(unqueued).enqueue(None, approved, by="bob")
    core = InMemoryLifecycle()
    orphan = core.add(record(ExecutionStatus.AWAITING_APPROVAL, policy="gone"))
    with pytest.raises(ConflictError, match="timeout policy"):
        await dispatcher(core).enqueue(None, orphan, by="bob")
    assert core.jobs == {}
    assert core.executions[orphan.id].status is ExecutionStatus.AWAITING_APPROVAL


async def test_a_release_of_an_execution_no_longer_waiting_is_refused() -> None:
    core = InMemoryLifecycle()
    cancelled = core.add(record(ExecutionStatus.CANCELLED))
    with pytest.raises(FSMError):
        await dispatcher(core).enqueue(None, cancelled, by="bob")
    assert core.jobs == {}


async def test_a_release_while_the_queue_is_down_leaves_the_approval_waiting() -> None:
    core = InMemoryLifecycle(queue_up=False)
    approved = core.add(record(ExecutionStatus.AWAITING_APPROVAL))
    with pytest.raises(QueueUnavailableError):
        await dispatcher(core).enqueue(None, approved, by="bob")
    assert core.executions[approved.id].status is ExecutionStatus.AWAITING_APPROVAL
    assert core.jobs == {}


async def run_immediately(core: InMemoryLifecycle, worker: Worker) -> ExecutionRecord:
    approved = core.add(record(ExecutionStatus.AWAITING_APPROVAL))
    releases = dispatcher(core, worker)
    releases.start_immediate(approved, "token")
    await releases.drain(5.0)
    assert worker.calls == [approved.id]
    return approved


async def test_an_immediate_release_no_worker_could_start_ends_failed_and_frees_its_key() -> None:
    core = InMemoryLifecycle()
    approved = await run_immediately(core, Worker(WorkerUnavailableError()))
    execution = core.executions[approved.id]
    assert execution.status is ExecutionStatus.FAILED
    assert execution.error_class == "WORKER_UNAVAILABLE"
    assert execution.key_retired
    assert execution.transitions[-1][1] == "approvals"


@pytest.mark.parametrize("error", [None, ResourceBusyError(), RuntimeError("bug")])
async def test_an_immediate_release_the_worker_took_is_the_workers_to_end(
    error: Exception | None,
) -> None:
    """The worker answered (or refused and recorded why, or the call broke): the dispatcher
    changes nothing on the execution."""
    core = InMemoryLifecycle()
    approved = await run_immediately(core, Worker(error))
    execution = core.executions[approved.id]
    assert execution.status is ExecutionStatus.AWAITING_APPROVAL
    assert execution.transitions == []
    assert not execution.key_retired
