"""The approvals service's ``ApprovalDecisions`` against the in-memory lifecycle and approvals
(no Postgres, no Redis): who may read and decide (``approvals:read`` / ``approvals:decide``, in
the tenant that owns the approval, another tenant's principal refused and audited under the
tenant it targeted), what a grant or a rejection does at levels 1 to 3, that the first of two
racing decisions wins, that a grant of an approval whose plan changed invalidates it, and the
errors of unknown ids and bad input. The port's own behaviours are checked against the real
core in tests/integration/test_lifecycle_facade.py; the authorizer is the real one, its role
bindings given instead of read from Postgres and its audit rows kept in a list.
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass, replace
from datetime import timedelta
from uuid import UUID, uuid4

import pytest

from opsconductor.approvals.logic.decisions import (
    MAX_COMMENT_CHARS,
    ApprovalDecisions,
    Caller,
    covered_scope,
)
from opsconductor.approvals.logic.dispatch import ExecutionDispatcher
from opsconductor.common.auth import Principal
from opsconductor.common.errors import (
    ApprovalDecidedError,
    ApprovalExpiredError,
    ApprovalInvalidatedError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    QueueUnavailableError,
    SelfApprovalError,
    WorkerUnavailableError,
)
from opsconductor.common.fsm import ExecutionStatus, StepStatus
from opsconductor.lifecycle.approval_fake import InMemoryApprovals
from opsconductor.lifecycle.approval_port import ApprovalRecord, ApprovalState
from opsconductor.lifecycle.fake import InMemoryLifecycle
from opsconductor.lifecycle.storage.executions import NewExecution
from opsconductor.lifecycle.storage.paging import InvalidPageRequestError
from tests.unit.roles_world import MEDIUM_MODIFY, Roles

TENANT = "tenant-acme"
OTHER = "tenant-evil"
S = ExecutionStatus
TTL = timedelta(hours=1)
POLICY = MEDIUM_MODIFY
BINDINGS = {
    (TENANT, "alice"): frozenset({"operator"}),
    (TENANT, "bob"): frozenset({"approver"}),
    (TENANT, "carol"): frozenset({"approver"}),
    (TENANT, "vera"): frozenset({"viewer"}),
    (OTHER, "mallory"): frozenset({"approver"}),
}


def caller(actor: str, tenant: str = TENANT) -> Caller:
    return Caller(Principal(actor_id=actor, tenant_id=tenant), f"token-of-{actor}", "10.1.2.3")


class Worker:
    """The worker port: records each run it was asked for, then answers or raises ``error``."""

    def __init__(self) -> None:
        self.runs: list[tuple[UUID, str]] = []
        self.error: Exception | None = None

    async def run_immediate(
        self, *, tenant_id: str, execution_id: UUID, token: str, timeout_s: float
    ) -> object:
        self.runs.append((execution_id, token))
        if self.error is not None:
            raise self.error
        return object()


@dataclass
class World:
    core: InMemoryLifecycle
    approvals: InMemoryApprovals
    roles: Roles
    worker: Worker
    dispatcher: ExecutionDispatcher
    decisions: ApprovalDecisions

    async def waiting(
        self, *, level: int = 1, mode: str = "background", tenant: str = TENANT
    ) -> tuple[UUID, ApprovalRecord]:
        """A new execution of alice's awaiting its whole-plan approval."""
        record, _ = await self.core.create(
            NewExecution(
                tenant_id=tenant,
                actor_id="alice",
                request_id="req-1",
                idempotency_key=hashlib.sha256(uuid4().bytes).hexdigest(),
                plan_hash="a" * 64,
                plan_snapshot={"plan": {"name": "p", "steps": STEPS}},
                plan_snapshot_hash="b" * 64,
                execution_mode=mode,
                sla_class="medium",
                action_class="modify",
                approval_level=level,
                priority=50,
                timeout_policy_id="medium_modify",
                timeout_ms=30_000,
                estimated_duration_ms=100,
                record_only=False,
                steps=[("s1", 0, "noop", "modify"), ("s2", 1, "noop", "modify")],
            ),
            dedup_window=timedelta(hours=24),
        )
        return record.id, await self.approvals.request(record.id, ttl=TTL, by="api")

    def status(self, execution_id: UUID) -> ExecutionStatus:
        return self.core.executions[execution_id].status

    def jobs_of(self, execution_id: UUID) -> int:
        return sum(1 for job in self.core.jobs.values() if job.execution_id == execution_id)

    async def paused_before(self, execution_id: UUID, step_id: str) -> ApprovalRecord:
        """What the worker does to a released level-3 execution: claim it, pause before
        ``step_id``."""
        token = uuid4()
        claimed = await self.core.claim(
            execution_id, lease_token=token, worker_id="w1", budget=timedelta(seconds=30)
        )
        assert claimed is not None
        paused = await self.approvals.request_step(
            execution_id, step_id, lease_token=token, ttl=TTL, by="w1"
        )
        assert paused is not None
        return paused


STEPS = [
    {"id": "s1", "action": "noop", "targets": [{"ref": "hosts:b"}, {"ref": "hosts:a"}]},
    {"id": "s2", "action": "shell", "targets": [{"ref": "hosts:c"}, "not-a-target"]},
]


@pytest.fixture
def world() -> World:
    core = InMemoryLifecycle()
    approvals = InMemoryApprovals(core)
    roles = Roles(BINDINGS, tier="approvals")
    worker = Worker()
    dispatcher = ExecutionDispatcher(
        lifecycle=core, worker=worker, policies={"medium_modify": POLICY}, margin_s=1.0
    )
    decisions = ApprovalDecisions(approvals=approvals, authorizer=roles, dispatcher=dispatcher)
    return World(core, approvals, roles, worker, dispatcher, decisions)


@pytest.mark.parametrize("level", [1, 2, 3])
async def test_a_grant_records_the_decision_and_queues_a_background_execution(
    world: World, level: int
) -> None:
    eid, approval = await world.waiting(level=level)
    decided = await world.decisions.approve(caller("bob"), TENANT, str(approval.id), "looks ok")
    assert (decided.state, decided.decided_by, decided.auth_method) == (
        ApprovalState.APPROVED,
        "bob",
        "jwt",
    )
    assert (decided.source_ip, decided.comment, decided.level) == ("10.1.2.3", "looks ok", level)
    assert decided.plan is not None  # answered with the plan it covers
    assert decided.plan["name"] == "p"
    assert world.status(eid) is S.QUEUED
    assert world.core.executions[eid].transitions[-1] == (S.QUEUED, "bob", {"reason": "approved"})
    (job,) = world.core.jobs.values()
    assert (job.execution_id, job.max_attempts) == (eid, POLICY.max_attempts)
    assert world.worker.runs == []


async def test_a_grant_of_an_immediate_execution_hands_it_to_a_worker_with_the_token(
    world: World,
) -> None:
    eid, approval = await world.waiting(mode="immediate")
    decided = await world.decisions.approve(caller("bob"), TENANT, str(approval.id), "")
    assert decided.state is ApprovalState.APPROVED
    assert decided.comment is None  # an empty comment is none
    await world.dispatcher.drain(5.0)
    assert world.worker.runs == [(eid, "token-of-bob")]
    assert world.core.jobs == {}
    # Started by the worker (here: nobody ran it), never queued.
    assert world.status(eid) is S.AWAITING_APPROVAL


async def test_an_immediate_grant_no_worker_could_start_ends_failed_and_frees_its_key(
    world: World,
) -> None:
    world.worker.error = WorkerUnavailableError()
    eid, approval = await world.waiting(mode="immediate")
    await world.decisions.approve(caller("bob"), TENANT, str(approval.id), "")
    await world.dispatcher.drain(5.0)
    execution = world.core.executions[eid]
    assert (execution.status, execution.error_class) == (S.FAILED, "WORKER_UNAVAILABLE")
    assert execution.key_retired
    # The decision stands: it was committed before the run was attempted.
    assert (await world.approvals.get(TENANT, approval.id)).state is ApprovalState.APPROVED


@pytest.mark.parametrize("level", [1, 2, 3])
async def test_a_rejection_ends_the_execution_rejected_and_runs_nothing(
    world: World, level: int
) -> None:
    eid, approval = await world.waiting(level=level)
    decided = await world.decisions.reject(caller("carol"), TENANT, str(approval.id), "no")
    assert (decided.state, decided.decided_by, decided.comment) == (
        ApprovalState.REJECTED,
        "carol",
        "no",
    )
    assert decided.plan is not None
    assert world.status(eid) is S.REJECTED
    record = await world.core.get(TENANT, eid)
    assert {s.status for s in record.steps} == {StepStatus.SKIPPED}
    assert not world.core.executions[eid].key_retired  # a rejected plan is not re-requested
    assert world.core.jobs == {}
    assert world.worker.runs == []
    with pytest.raises(ApprovalDecidedError):
        await world.decisions.approve(caller("bob"), TENANT, str(approval.id), "")


async def test_a_level_3_step_is_granted_and_its_execution_queued_again(world: World) -> None:
    eid, approval = await world.waiting(level=3)
    await world.decisions.approve(caller("bob"), TENANT, str(approval.id), "")
    paused = await world.paused_before(eid, "s1")
    assert (paused.step_id, paused.level, paused.state) == ("s1", 3, ApprovalState.PENDING)
    assert world.status(eid) is S.AWAITING_APPROVAL
    decided = await world.decisions.approve_step(caller("carol"), TENANT, str(eid), "s1", "go")
    assert (decided.id, decided.state, decided.step_id) == (
        paused.id,
        ApprovalState.APPROVED,
        "s1",
    )
    assert world.status(eid) is S.QUEUED
    assert world.jobs_of(eid) == 2  # once after the plan's grant, once after the step's
    assert covered_scope(decided) == (["hosts:a", "hosts:b"], ["noop"])
    # The step is decided: a second grant is refused, a step never asked for is not found.
    with pytest.raises(ApprovalDecidedError):
        await world.decisions.approve_step(caller("bob"), TENANT, str(eid), "s1", "")
    with pytest.raises(NotFoundError):
        await world.decisions.approve_step(caller("bob"), TENANT, str(eid), "s2", "")


async def test_a_level_3_step_can_be_refused_which_ends_the_execution(world: World) -> None:
    eid, approval = await world.waiting(level=3)
    await world.decisions.approve(caller("bob"), TENANT, str(approval.id), "")
    paused = await world.paused_before(eid, "s2")
    decided = await world.decisions.reject(caller("carol"), TENANT, str(paused.id), "not now")
    assert (decided.state, decided.step_id) == (ApprovalState.REJECTED, "s2")
    assert world.status(eid) is S.REJECTED
    assert covered_scope(decided) == (["hosts:c"], ["shell"])
    # A whole-plan approval covers every step.
    whole = await world.approvals.get(TENANT, approval.id)
    assert covered_scope(whole) == (["hosts:a", "hosts:b", "hosts:c"], ["noop", "shell"])


async def test_two_racing_decisions_leave_exactly_one(world: World) -> None:
    eid, approval = await world.waiting()
    results = await asyncio.gather(
        world.decisions.approve(caller("bob"), TENANT, str(approval.id), "yes"),
        world.decisions.reject(caller("carol"), TENANT, str(approval.id), "no"),
        return_exceptions=True,
    )
    winners = [r for r in results if isinstance(r, ApprovalRecord)]
    losers = [r for r in results if not isinstance(r, ApprovalRecord)]
    assert len(winners) == 1, results
    assert len(losers) == 1
    assert isinstance(losers[0], ApprovalDecidedError), losers
    assert losers[0].reason == "APPROVAL_ALREADY_DECIDED"
    stored = await world.approvals.get(TENANT, approval.id)
    assert (stored.state, stored.decided_by) == (winners[0].state, winners[0].decided_by)
    expected = S.QUEUED if stored.state is ApprovalState.APPROVED else S.REJECTED
    assert world.status(eid) is expected
    assert world.jobs_of(eid) == (1 if expected is S.QUEUED else 0)


async def test_two_racing_grants_queue_the_execution_once(world: World) -> None:
    eid, approval = await world.waiting()
    results = await asyncio.gather(
        world.decisions.approve(caller("bob"), TENANT, str(approval.id), ""),
        world.decisions.approve(caller("carol"), TENANT, str(approval.id), ""),
        return_exceptions=True,
    )
    assert sum(isinstance(r, ApprovalRecord) for r in results) == 1, results
    assert sum(isinstance(r, ApprovalDecidedError) for r in results) == 1, results
    assert world.jobs_of(eid) == 1


async def test_a_grant_of_an_approval_whose_plan_changed_invalidates_it(world: World) -> None:
    eid, approval = await world.waiting()
    # The execution's stored plan no longer is the one approved.
    world.core.records[eid] = replace(world.core.records[eid], plan_hash="f" * 64)
    with pytest.raises(ApprovalInvalidatedError) as raised:
        await world.decisions.approve(caller("bob"), TENANT, str(approval.id), "")
    assert raised.value.details["mismatched"] == ["plan_hash"]
    assert (await world.approvals.get(TENANT, approval.id)).state is ApprovalState.INVALIDATED
    execution = world.core.executions[eid]
    assert (execution.status, execution.error_class) == (S.FAILED, "APPROVAL_INVALIDATED")
    assert execution.key_retired  # nothing ran: the plan may be submitted again
    assert world.core.jobs == {}
    # Closed: no later decision can be taken on it.
    with pytest.raises(ApprovalInvalidatedError):
        await world.decisions.reject(caller("carol"), TENANT, str(approval.id), "")


async def test_a_raised_level_is_a_broken_binding_too(world: World) -> None:
    eid, approval = await world.waiting(level=1)
    world.core.records[eid] = replace(world.core.records[eid], approval_level=2)
    with pytest.raises(ApprovalInvalidatedError) as raised:
        await world.decisions.approve(caller("bob"), TENANT, str(approval.id), "")
    assert raised.value.details["mismatched"] == ["level"]


async def test_an_expired_request_cannot_be_decided(world: World) -> None:
    eid, approval = await world.waiting()
    world.approvals.approvals[approval.id] = replace(approval, expires_at=approval.created_at)
    with pytest.raises(ApprovalExpiredError):
        await world.decisions.approve(caller("bob"), TENANT, str(approval.id), "")
    assert world.status(eid) is S.AWAITING_APPROVAL
    pending, _ = await world.decisions.list_pending(
        caller("vera").principal, TENANT, page_size=0, page_token=None
    )
    assert pending == []


async def test_the_requester_never_decides_her_own_request(world: World) -> None:
    eid, approval = await world.waiting()
    # alice holds approvals:decide here, yet she requested it.
    world.roles.bindings[(TENANT, "alice")] = frozenset({"approver"})
    for decide in (world.decisions.approve, world.decisions.reject):
        with pytest.raises(SelfApprovalError):
            await decide(caller("alice"), TENANT, str(approval.id), "")
    assert (await world.approvals.get(TENANT, approval.id)).state is ApprovalState.PENDING
    assert world.status(eid) is S.AWAITING_APPROVAL


async def test_reading_needs_approvals_read_and_deciding_approvals_decide(world: World) -> None:
    eid, approval = await world.waiting()
    vera = caller("vera")
    # A viewer reads the request and the tenant's pending page...
    read = await world.decisions.get(vera.principal, TENANT, str(approval.id))
    assert (read.id, read.execution_id, read.state) == (approval.id, eid, ApprovalState.PENDING)
    page, _ = await world.decisions.list_pending(
        vera.principal, TENANT, page_size=10, page_token=None
    )
    assert [a.id for a in page] == [approval.id]
    # ...but decides nothing; alice (an operator) neither; a principal of no role reads nothing.
    for who, decide in ((vera, world.decisions.approve), (caller("alice"), world.decisions.reject)):
        with pytest.raises(PermissionDeniedError) as denied:
            await decide(who, TENANT, str(approval.id), "")
        assert denied.value.details["missing"] == ["approvals:decide"]
    with pytest.raises(PermissionDeniedError):
        await world.decisions.approve_step(vera, TENANT, str(eid), "s1", "")
    nobody = Principal(actor_id="nobody", tenant_id=TENANT)
    with pytest.raises(PermissionDeniedError):
        await world.decisions.get(nobody, TENANT, str(approval.id))
    with pytest.raises(PermissionDeniedError):
        await world.decisions.list_pending(nobody, TENANT, page_size=0, page_token=None)
    assert {(r.tenant_id, r.actor_id) for r in world.roles.audited} == {
        (TENANT, "vera"),
        (TENANT, "alice"),
        (TENANT, "nobody"),
    }
    assert (await world.approvals.get(TENANT, approval.id)).state is ApprovalState.PENDING


async def test_another_tenants_principal_is_refused_audited_under_the_target_and_told_nothing(
    world: World,
) -> None:
    eid, approval = await world.waiting()
    mallory = caller("mallory", OTHER)
    attempts = [
        world.decisions.approve(mallory, TENANT, str(approval.id), ""),
        world.decisions.approve(mallory, OTHER, str(approval.id), ""),
        world.decisions.reject(mallory, OTHER, str(approval.id), ""),
        world.decisions.get(mallory.principal, OTHER, str(approval.id)),
        world.decisions.approve_step(mallory, OTHER, str(eid), "s1", ""),
    ]
    for attempt in attempts:
        with pytest.raises(PermissionDeniedError) as denied:
            await attempt
        # Neither the owning tenant nor the execution is named to the caller.
        told = f"{denied.value} {denied.value.details}"
        assert TENANT not in told
        assert str(eid) not in told
        assert denied.value.details["denial_reason"] == "TENANT_MISMATCH"
    # Each attempt is audited under the tenant it targeted, linked to the execution.
    assert len(world.roles.audited) == len(attempts)
    assert {(r.tenant_id, r.actor_id, r.execution_id) for r in world.roles.audited} == {
        (TENANT, "mallory", eid)
    }
    assert (await world.approvals.get(TENANT, approval.id)).state is ApprovalState.PENDING
    assert world.status(eid) is S.AWAITING_APPROVAL
    # Its own tenant's page does not show this tenant's request.
    page, _ = await world.decisions.list_pending(
        mallory.principal, OTHER, page_size=0, page_token=None
    )
    assert page == []


async def test_an_approval_named_under_the_wrong_tenant_is_not_found(world: World) -> None:
    """bob decides in his own tenant but names another: the request is not found there, as an
    unknown id would be (ids cannot be probed through the tenant field)."""
    _, approval = await world.waiting()
    with pytest.raises(NotFoundError):
        await world.decisions.approve(caller("bob"), OTHER, str(approval.id), "")
    assert (await world.approvals.get(TENANT, approval.id)).state is ApprovalState.PENDING


@pytest.mark.parametrize("approval_id", ["not-a-uuid", "7d1e5b52-0000-4000-8000-000000000000", ""])
async def test_unknown_or_malformed_ids_are_not_found(world: World, approval_id: str) -> None:
    bob = caller("bob")
    with pytest.raises(NotFoundError):
        await world.decisions.get(bob.principal, TENANT, approval_id)
    with pytest.raises(NotFoundError):
        await world.decisions.approve(bob, TENANT, approval_id, "")
    with pytest.raises(NotFoundError):
        await world.decisions.reject(bob, TENANT, approval_id, "")
    with pytest.raises(NotFoundError):
        await world.decisions.approve_step(bob, TENANT, approval_id or "x", "s1", "")
    assert world.roles.audited == []  # an unknown id is no one's: nothing to audit


async def test_a_comment_over_the_limit_is_bad_input_and_decides_nothing(world: World) -> None:
    eid, approval = await world.waiting()
    long = "x" * (MAX_COMMENT_CHARS + 1)
    for decide in (world.decisions.approve, world.decisions.reject):
        with pytest.raises(InvalidArgumentError) as raised:
            await decide(caller("bob"), TENANT, str(approval.id), long)
        assert raised.value.details["field"] == "comment"
    assert (await world.approvals.get(TENANT, approval.id)).state is ApprovalState.PENDING
    assert world.status(eid) is S.AWAITING_APPROVAL
    ok = await world.decisions.approve(caller("bob"), TENANT, str(approval.id), long[:-1])
    assert ok.comment == long[:-1]


async def test_pending_requests_are_paged_oldest_first_with_a_token_bound_to_the_tenant(
    world: World,
) -> None:
    ids = [(await world.waiting())[1].id for _ in range(5)]
    await world.waiting(tenant=OTHER)  # another tenant's: never listed here
    vera = caller("vera").principal
    seen: list[UUID] = []
    token: str | None = None
    pages = 0
    while True:
        page, token = await world.decisions.list_pending(
            vera, TENANT, page_size=2, page_token=token
        )
        seen += [a.id for a in page]
        pages += 1
        if token is None:
            break
    assert (seen, pages) == (ids, 3)
    _, first_token = await world.decisions.list_pending(vera, TENANT, page_size=2, page_token=None)
    assert first_token is not None
    # A decided request leaves the page.
    await world.decisions.approve(caller("bob"), TENANT, str(ids[0]), "")
    page, _ = await world.decisions.list_pending(vera, TENANT, page_size=0, page_token=None)
    assert [a.id for a in page] == ids[1:]
    # Bad paging is bad input, never an internal error.
    with pytest.raises(InvalidPageRequestError) as bad:
        await world.decisions.list_pending(vera, TENANT, page_size=-1, page_token=None)
    assert bad.value.reason == "INVALID_ARGUMENT"
    with pytest.raises(InvalidPageRequestError):
        await world.decisions.list_pending(vera, TENANT, page_size=2, page_token="garbage")
    mallory = caller("mallory", OTHER).principal
    with pytest.raises(InvalidPageRequestError):  # issued for another tenant's listing
        await world.decisions.list_pending(mallory, OTHER, page_size=2, page_token=first_token)


async def test_a_decision_on_an_execution_no_longer_waiting_is_refused(world: World) -> None:
    eid, approval = await world.waiting()
    world.core._move(eid, S.CANCELLED, by="alice", payload=None)
    with pytest.raises(FailedPreconditionError) as refused:
        await world.decisions.approve(caller("bob"), TENANT, str(approval.id), "")
    assert type(refused.value) is FailedPreconditionError
    assert (await world.approvals.get(TENANT, approval.id)).state is ApprovalState.PENDING
    assert world.core.jobs == {}


async def test_a_grant_while_the_queue_is_down_leaves_the_request_pending(world: World) -> None:
    eid, approval = await world.waiting()
    world.core.queue_up = False
    with pytest.raises(QueueUnavailableError):
        await world.decisions.approve(caller("bob"), TENANT, str(approval.id), "")
    # The decision rolled back with the release: the approver simply retries.
    assert (await world.approvals.get(TENANT, approval.id)).state is ApprovalState.PENDING
    assert world.status(eid) is S.AWAITING_APPROVAL
    world.core.queue_up = True
    decided = await world.decisions.approve(caller("bob"), TENANT, str(approval.id), "")
    assert decided.state is ApprovalState.APPROVED
    assert world.status(eid) is S.QUEUED
