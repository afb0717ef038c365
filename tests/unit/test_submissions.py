"""The api's ``Submissions`` against the in-memory lifecycle (no Postgres, no Redis): what an
immediate submit creates, how it hands the execution to the worker and returns the worker's
answer, what a duplicate does, what is left when no worker could start it, and what the tenant's
immediate and queued quotas refuse. The lifecycle's own behaviours are checked against the real
core in tests/integration/test_lifecycle_facade.py; the role, flag and duration readers stood in for
here are the real ones' (tests/integration cover their reads from Postgres).

Background submits too: queued with the policy's budget in one transaction, nothing left when
the queue cannot take it, the tenant's queued quota. Not covered here: the approval path (its
approval request is written on the submit's Postgres connection, outside the lifecycle port).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import timedelta
from typing import Any
from uuid import UUID

import pytest

from opsconductor.actions.planning import ExecutionMode
from opsconductor.actions.registry import default_registry
from opsconductor.api.logic.submission import Submissions, SubmitRequest, SubmitResult
from opsconductor.common.approval_policy import ApprovalPolicy
from opsconductor.common.auth import Principal
from opsconductor.common.errors import (
    FeatureDisabledError,
    FSMError,
    QueueUnavailableError,
    QuotaExceededError,
    WorkerUnavailableError,
)
from opsconductor.common.fsm import ExecutionStatus
from opsconductor.common.tenant_policy import TenantPolicies
from opsconductor.lifecycle.fake import InMemoryLifecycle
from opsconductor.lifecycle.storage.execution_stats import ObservedDurations
from opsconductor.lifecycle.storage.flags import FeatureFlags, FlagCache
from opsconductor.lifecycle.storage.policies import TimeoutPolicy
from opsconductor.policy.quotas import QuotaLimits, TenantQuotas
from opsconductor.policy.rbac import Authorizer, RbacPolicy

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


class Roles(Authorizer):
    """The real authorizer, its role bindings given instead of read from Postgres."""

    def __init__(self, bindings: dict[tuple[str, str], frozenset[str]]) -> None:
        super().__init__(None, RbacPolicy.load(), tier="api")  # type: ignore[arg-type]
        self._bindings = bindings

    async def roles_for(self, principal: Principal, tenant_id: str) -> frozenset[str]:
        if principal.tenant_id != tenant_id:
            return frozenset()
        return self._bindings.get((tenant_id, principal.actor_id), frozenset())


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
        authorizer=Roles({(TENANT, "alice"): frozenset({"operator"})}),
        actions=default_registry(),
        flags=Flags(flags or FeatureFlags(stage_e_enabled=True, all_tenants_enabled=True)),
        policies={POLICY.id: POLICY},
        approval_policy=ApprovalPolicy.load(),
        observed=NoHistory(),
        worker=worker,
        lifecycle=lifecycle,
        dedup_window=timedelta(hours=24),
        tenant_policies=policies,
        quotas=TenantQuotas(QuotaLimits(0, 0, max_immediate), policies),
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
