"""The api's ``Submissions`` against the in-memory lifecycle (no Postgres, no Redis): what an
immediate submit creates, how it hands the execution to the worker and returns the worker's
answer, what a duplicate does, what is left when no worker could start it, and what the tenant's
immediate and queued quotas refuse. The lifecycle's own behaviours are checked against the real
core in tests/integration/test_lifecycle_facade.py; the role, flag and duration readers stood in for
here are the real ones' (tests/integration cover their reads from Postgres).

Background submits too: queued with the policy's budget in one transaction, nothing left when
the queue cannot take it, the tenant's queued quota. And the approval path, against the
approvals port's fake (tests/integration/test_lifecycle_facade.py runs it against Postgres
too): a plan needing approval is created awaiting its request in one transaction and runs
nothing; a presented approval of another plan is invalidated and refused, one presented by
someone else or from another tenant refused and left as it was.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import timedelta
from typing import Any
from uuid import UUID, uuid4

import pytest

from opsconductor.actions.planning import ExecutionMode
from opsconductor.actions.registry import default_registry
from opsconductor.api.logic.submission import Submissions, SubmitRequest, SubmitResult
from opsconductor.common.approval_policy import ApprovalPolicy
from opsconductor.common.auth import Principal
from opsconductor.common.errors import (
    ApprovalInvalidatedError,
    ApprovalLevelNotEnabledError,
    FeatureDisabledError,
    FSMError,
    NotFoundError,
    PermissionDeniedError,
    QueueUnavailableError,
    QuotaExceededError,
    WorkerUnavailableError,
)
from opsconductor.common.fsm import ExecutionStatus
from opsconductor.common.tenant_policy import TenantPolicies
from opsconductor.lifecycle.approval_fake import InMemoryApprovals
from opsconductor.lifecycle.approval_port import ApprovalDecision, ApprovalState
from opsconductor.lifecycle.fake import InMemoryLifecycle
from opsconductor.lifecycle.storage.execution_stats import ObservedDurations
from opsconductor.lifecycle.storage.flags import FeatureFlags, FlagCache
from opsconductor.lifecycle.storage.policies import TimeoutPolicy
from opsconductor.policy.quotas import QuotaLimits, TenantQuotas
from tests.unit.roles_world import MEDIUM_MODIFY, Roles

TENANT = "t1"
ALICE = Principal(actor_id="alice", tenant_id=TENANT)
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


class Flags(FlagCache):
    def __init__(self, flags: FeatureFlags) -> None:
        super().__init__(None)
        self.flags = flags

    async def get(self) -> FeatureFlags:
        return self.flags


class NoHistory(ObservedDurations):
    """No action has run yet: estimates come from the handlers alone."""

    def __init__(self) -> None:
        super().__init__(None)  # type: ignore[arg-type]

    async def p95_ms(self, actions: Iterable[str]) -> dict[str, int]:
        return {}


class Worker:
    """The worker port: records each hand-over, then answers, raises, or plays the worker."""

    def __init__(self, lifecycle: InMemoryLifecycle) -> None:
        self.lifecycle = lifecycle
        self.handed: list[UUID] = []
        self.error: Exception | None = None
        #: Play a worker that took and finished the execution before raising ``error``.
        self.finish_first = False

    async def run_immediate(
        self, *, tenant_id: str, execution_id: UUID, token: str, timeout_s: float
    ) -> object:
        self.handed.append(execution_id)
        if self.finish_first:
            self.lifecycle._move(execution_id, ExecutionStatus.RUNNING, by="w1", payload=None)
            self.lifecycle._move(execution_id, ExecutionStatus.SUCCEEDED, by="w1", payload=None)
        if self.error is not None:
            raise self.error
        return {"answer_of": execution_id}


def noop_plan(tag: str = "a") -> dict[str, Any]:
    return {
        "name": f"noop-{tag}",
        "sla_class": "fast",
        "steps": [
            {
                "id": "noop",
                "action": "noop",
                "action_class": "read",
                "targets": [{"ref": f"plans:{tag}"}],
                "params": {},
            }
        ],
    }


def build(
    lifecycle: InMemoryLifecycle,
    worker: Worker,
    *,
    flags: FeatureFlags | None = None,
    max_immediate: int = 0,
) -> Submissions:
    policies = TenantPolicies.load()
    return Submissions(
        pool=None,  # type: ignore[arg-type]  # every store it reaches here is faked
        authorizer=Roles(
            {
                (TENANT, "alice"): frozenset({"operator"}),
                (TENANT, "carol"): frozenset({"operator"}),
            },
            tier="api",
        ),
        actions=default_registry(),
        flags=Flags(flags or FeatureFlags(stage_e_enabled=True, all_tenants_enabled=True)),
        policies={POLICY.id: POLICY, MEDIUM_MODIFY.id: MEDIUM_MODIFY},
        approval_policy=ApprovalPolicy.load(),
        observed=NoHistory(),
        worker=worker,
        lifecycle=lifecycle,
        dedup_window=timedelta(hours=24),
        tenant_policies=policies,
        quotas=TenantQuotas(QuotaLimits(0, 0, max_immediate), policies),
        approvals=InMemoryApprovals(lifecycle),
    )


@pytest.fixture
def lifecycle() -> InMemoryLifecycle:
    return InMemoryLifecycle()


@pytest.fixture
def worker(lifecycle: InMemoryLifecycle) -> Worker:
    return Worker(lifecycle)


async def test_an_immediate_submit_creates_it_hands_it_over_and_returns_the_workers_answer(
    lifecycle: InMemoryLifecycle, worker: Worker
) -> None:
    result = await build(lifecycle, worker).submit(
        ALICE, "tok", SubmitRequest(TENANT, noop_plan(), request_id="req-1")
    )
    assert not result.deduplicated
    assert result.worker_answer == {"answer_of": result.execution.id}
    assert worker.handed == [result.execution.id]
    stored = await lifecycle.get(TENANT, result.execution.id)
    assert (stored.status, stored.execution_mode, stored.actor_id, stored.request_id) == (
        ExecutionStatus.PENDING,  # the (fake) worker answered without running it
        "immediate",
        "alice",
        "req-1",
    )
    assert [s.step_id for s in stored.steps] == ["noop"]
    assert stored.timeout_policy_id == POLICY.id
    assert lifecycle.jobs == {}  # immediate: nothing queued


async def test_a_duplicate_of_an_execution_no_worker_took_is_handed_over_again(
    lifecycle: InMemoryLifecycle, worker: Worker
) -> None:
    submissions = build(lifecycle, worker)
    first = await submissions.submit(ALICE, "tok", SubmitRequest(TENANT, noop_plan()))
    again = await submissions.submit(ALICE, "tok", SubmitRequest(TENANT, noop_plan()))
    assert again.deduplicated
    assert again.execution.id == first.execution.id
    assert worker.handed == [first.execution.id, first.execution.id]
    assert len(lifecycle.records) == 1


async def test_a_duplicate_of_a_finished_execution_gets_its_outcome_without_a_hand_over(
    lifecycle: InMemoryLifecycle, worker: Worker
) -> None:
    submissions = build(lifecycle, worker)
    worker.finish_first = True
    first = await submissions.submit(ALICE, "tok", SubmitRequest(TENANT, noop_plan()))
    again = await submissions.submit(ALICE, "tok", SubmitRequest(TENANT, noop_plan()))
    assert again.deduplicated
    assert again.worker_answer is None
    assert again.execution.id == first.execution.id
    assert again.execution.status is ExecutionStatus.SUCCEEDED
    assert worker.handed == [first.execution.id]


async def test_when_another_hand_over_ran_it_the_submit_reports_its_outcome(
    lifecycle: InMemoryLifecycle, worker: Worker
) -> None:
    worker.finish_first = True
    worker.error = FSMError("Illegal state transition succeeded -> running")
    result = await build(lifecycle, worker).submit(ALICE, "tok", SubmitRequest(TENANT, noop_plan()))
    assert result.worker_answer is None
    assert result.execution.status is ExecutionStatus.SUCCEEDED


async def test_no_worker_reachable_ends_it_failed_and_frees_its_key_for_a_retry(
    lifecycle: InMemoryLifecycle, worker: Worker
) -> None:
    submissions = build(lifecycle, worker)
    worker.error = WorkerUnavailableError("no worker")
    with pytest.raises(WorkerUnavailableError):
        await submissions.submit(ALICE, "tok", SubmitRequest(TENANT, noop_plan()))
    (failed_id,) = lifecycle.records
    failed = lifecycle.executions[failed_id]
    assert failed.status is ExecutionStatus.FAILED
    assert (failed.error_class, failed.error_message) == (
        "WORKER_UNAVAILABLE",
        "no worker could be reached",
    )
    assert failed.key_retired
    assert failed.transitions[-1][1] == "api"
    worker.error = None
    retried = await submissions.submit(ALICE, "tok", SubmitRequest(TENANT, noop_plan()))
    assert not retried.deduplicated  # a new execution, not the failure replayed
    assert retried.execution.id != failed_id


async def test_a_worker_that_refused_it_names_its_reason_in_the_failure(
    lifecycle: InMemoryLifecycle, worker: Worker
) -> None:
    worker.error = RuntimeError("boom")
    with pytest.raises(RuntimeError):
        await build(lifecycle, worker).submit(ALICE, "tok", SubmitRequest(TENANT, noop_plan()))
    (failed,) = lifecycle.executions.values()
    assert (failed.status, failed.error_class, failed.error_message) == (
        ExecutionStatus.FAILED,
        "DISPATCH_FAILED",
        "the worker did not start it (DISPATCH_FAILED)",
    )


async def test_at_the_immediate_quota_a_new_plan_is_refused_and_nothing_is_written(
    lifecycle: InMemoryLifecycle, worker: Worker
) -> None:
    submissions = build(lifecycle, worker, max_immediate=1)
    first = await submissions.submit(ALICE, "tok", SubmitRequest(TENANT, noop_plan("a")))
    with pytest.raises(QuotaExceededError) as refused:
        await submissions.submit(ALICE, "tok", SubmitRequest(TENANT, noop_plan("b")))
    assert refused.value.reason == "QUOTA_EXCEEDED"
    assert list(lifecycle.records) == [first.execution.id]
    # The duplicate of the one in flight takes no slot: handed over again, not refused.
    again = await submissions.submit(ALICE, "tok", SubmitRequest(TENANT, noop_plan("a")))
    assert again.deduplicated


async def test_a_tenant_stage_e_is_not_enabled_for_is_refused_before_anything_is_written(
    lifecycle: InMemoryLifecycle, worker: Worker
) -> None:
    submissions = build(lifecycle, worker, flags=FeatureFlags(stage_e_enabled=True))
    with pytest.raises(FeatureDisabledError):
        await submissions.submit(ALICE, "tok", SubmitRequest(TENANT, noop_plan()))
    assert lifecycle.records == {}
    assert worker.handed == []


def background_plan(tag: str = "a") -> dict[str, Any]:
    return {**noop_plan(tag), "name": f"bg-{tag}"}


async def submit_background(submissions: Submissions, tag: str = "a") -> SubmitResult:
    return await submissions.submit(
        ALICE,
        "tok",
        SubmitRequest(
            TENANT, background_plan(tag), requested_mode=ExecutionMode.BACKGROUND, request_id="r"
        ),
    )


async def test_a_background_submit_queues_it_with_the_policys_budget_and_wakes_a_consumer(
    lifecycle: InMemoryLifecycle, worker: Worker
) -> None:
    result = await submit_background(build(lifecycle, worker))
    assert not result.deduplicated
    assert result.execution.status is ExecutionStatus.QUEUED
    assert [s.step_id for s in result.execution.steps] == ["noop"]
    assert result.job_id is not None
    job = lifecycle.jobs[result.job_id]
    assert (job.execution_id, job.tenant_id, job.max_attempts, job.request_id) == (
        result.execution.id,
        TENANT,
        POLICY.max_attempts,
        "r",
    )
    assert lifecycle.announcements == 1
    assert worker.handed == []  # the queue runs it, not a hand-over
    again = await submit_background(build(lifecycle, worker))
    assert again.deduplicated
    assert (again.execution.id, again.job_id) == (result.execution.id, result.job_id)
    assert len(lifecycle.jobs) == 1
    assert lifecycle.announcements == 1


@pytest.mark.parametrize("configured", [True, False])
async def test_a_background_submit_the_queue_cannot_take_leaves_nothing_behind(
    lifecycle: InMemoryLifecycle, worker: Worker, configured: bool
) -> None:
    if configured:
        lifecycle.queue_up = False
    else:
        lifecycle = InMemoryLifecycle(queue_configured=False)
    with pytest.raises(QueueUnavailableError):
        await submit_background(build(lifecycle, worker))
    assert lifecycle.records == {}  # rolled back with the push: the key stays free
    assert lifecycle.jobs == {}
    lifecycle.queue_up = True
    if configured:
        assert (await submit_background(build(lifecycle, worker))).job_id is not None


async def test_at_the_queued_quota_a_new_background_plan_is_refused_but_a_duplicate_is_not(
    lifecycle: InMemoryLifecycle, worker: Worker
) -> None:
    policies = TenantPolicies.load()
    submissions = build(lifecycle, worker)
    submissions._quotas = TenantQuotas(QuotaLimits(1, 0, 0), policies)
    first = await submit_background(submissions, "a")
    with pytest.raises(QuotaExceededError) as refused:
        await submit_background(submissions, "b")
    assert (refused.value.details["quota"], refused.value.details["in_use"]) == ("queued", 1)
    assert list(lifecycle.records) == [first.execution.id]
    again = await submit_background(submissions, "a")
    assert again.deduplicated
    assert again.job_id == first.job_id


GATED = FeatureFlags(stage_e_enabled=True, all_tenants_enabled=True, max_approval_level=3)


def modify_plan(tag: str = "a") -> dict[str, Any]:
    """A plan that changes something: approval level 1 under the packaged policy."""
    plan = noop_plan(tag)
    step = {**plan["steps"][0], "action_class": "modify"}
    return {**plan, "name": f"modify-{tag}", "sla_class": "medium", "steps": [step]}


async def test_a_plan_needing_approval_waits_for_its_request_and_runs_nothing(
    lifecycle: InMemoryLifecycle, worker: Worker
) -> None:
    submissions = build(lifecycle, worker, flags=GATED)
    result = await submissions.submit(ALICE, "tok", SubmitRequest(TENANT, modify_plan()))
    record = result.execution
    assert not result.deduplicated
    assert (record.status, record.approval_level) == (ExecutionStatus.AWAITING_APPROVAL, 1)
    (approval,) = lifecycle.approvals.values()
    assert record.approval_id == approval.id
    assert (approval.state, approval.level, approval.requested_by) == (
        ApprovalState.PENDING,
        1,
        "alice",
    )
    assert (approval.plan_hash, approval.plan_snapshot_hash) == (
        record.plan_hash,
        record.plan_snapshot_hash,
    )
    assert worker.handed == []
    assert lifecycle.jobs == {}
    # A duplicate finds it waiting; no second request.
    again = await submissions.submit(ALICE, "tok", SubmitRequest(TENANT, modify_plan()))
    assert again.deduplicated
    assert again.execution.id == record.id
    assert len(lifecycle.approvals) == 1


async def test_a_plan_above_the_enabled_approval_level_is_refused_before_anything_is_written(
    lifecycle: InMemoryLifecycle, worker: Worker
) -> None:
    with pytest.raises(ApprovalLevelNotEnabledError):
        await build(lifecycle, worker).submit(ALICE, "tok", SubmitRequest(TENANT, modify_plan()))
    assert (lifecycle.records, lifecycle.approvals) == ({}, {})


async def test_a_presented_approval_of_another_plan_is_invalidated_and_the_submit_refused(
    lifecycle: InMemoryLifecycle, worker: Worker
) -> None:
    submissions = build(lifecycle, worker, flags=GATED)
    first = await submissions.submit(ALICE, "tok", SubmitRequest(TENANT, modify_plan("a")))
    approval_id = str(first.execution.approval_id)
    # Presented with the plan it covers: accepted, and the submit is that plan's duplicate.
    same = SubmitRequest(TENANT, modify_plan("a"), approval_id=approval_id)
    duplicate = await submissions.submit(ALICE, "tok", same)
    assert (duplicate.deduplicated, duplicate.execution.id) == (True, first.execution.id)
    changed = SubmitRequest(TENANT, modify_plan("b"), approval_id=approval_id)
    with pytest.raises(ApprovalInvalidatedError) as refused:
        await submissions.submit(ALICE, "tok", changed)
    assert refused.value.details["mismatched"] == ["plan_hash", "plan_snapshot_hash"]
    assert refused.value.details["approval_state"] == "invalidated"
    assert lifecycle.approvals[first.execution.approval_id].state is ApprovalState.INVALIDATED
    ended = lifecycle.executions[first.execution.id]
    assert (ended.status, ended.error_class) == (ExecutionStatus.FAILED, "APPROVAL_INVALIDATED")
    assert list(lifecycle.records) == [first.execution.id]  # nothing created for the new plan
    assert ended.key_retired
    # Nothing ran: the original plan may be submitted again, and asks for a new approval.
    again = await submissions.submit(ALICE, "tok", SubmitRequest(TENANT, modify_plan("a")))
    assert not again.deduplicated
    assert again.execution.status is ExecutionStatus.AWAITING_APPROVAL
    assert again.execution.approval_id not in (None, first.execution.approval_id)


async def test_an_approval_presented_by_someone_else_or_from_another_tenant_is_refused(
    lifecycle: InMemoryLifecycle, worker: Worker
) -> None:
    submissions = build(lifecycle, worker, flags=GATED)
    first = await submissions.submit(ALICE, "tok", SubmitRequest(TENANT, modify_plan("a")))
    approval_id = str(first.execution.approval_id)
    carol = Principal(actor_id="carol", tenant_id=TENANT)
    changed = SubmitRequest(TENANT, modify_plan("b"), approval_id=approval_id)
    with pytest.raises(PermissionDeniedError) as denied:
        await submissions.submit(carol, "tok", changed)
    assert denied.value.details["denial_reason"] == "ACTOR_MISMATCH"
    assert isinstance(submissions._authorizer, Roles)
    (audited,) = submissions._authorizer.audited
    assert (audited.actor_id, audited.execution_id) == ("carol", first.execution.id)
    with pytest.raises(NotFoundError):
        await submissions.submit(
            ALICE, "tok", SubmitRequest(TENANT, modify_plan("b"), approval_id=str(uuid4()))
        )
    # Refused: the request still waits for its decision, nothing else was created.
    assert lifecycle.approvals[first.execution.approval_id].state is ApprovalState.PENDING
    assert list(lifecycle.records) == [first.execution.id]


async def test_an_approved_approval_presented_with_another_plan_is_refused_and_stays_approved(
    lifecycle: InMemoryLifecycle, worker: Worker
) -> None:
    """A person released the original plan: it runs as approved; the changed one is refused."""
    submissions = build(lifecycle, worker, flags=GATED)
    first = await submissions.submit(ALICE, "tok", SubmitRequest(TENANT, modify_plan("a")))
    approval_id = first.execution.approval_id
    assert approval_id is not None
    await InMemoryApprovals(lifecycle).decide(
        approval_id,
        tenant_id=TENANT,
        decision=ApprovalDecision(
            approve=True, decided_by="bob", auth_method="jwt", source_ip=None
        ),
    )
    changed = SubmitRequest(TENANT, modify_plan("b"), approval_id=str(approval_id))
    with pytest.raises(ApprovalInvalidatedError) as refused:
        await submissions.submit(ALICE, "tok", changed)
    assert refused.value.details["approval_state"] == "approved"
    assert lifecycle.approvals[approval_id].state is ApprovalState.APPROVED
    assert lifecycle.executions[first.execution.id].status is ExecutionStatus.AWAITING_APPROVAL
    assert list(lifecycle.records) == [first.execution.id]
