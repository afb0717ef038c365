"""SubmitExecution and PreviewPlan: validate, hash, decide, create idempotently, dispatch.

Order matters: the caller is authorized for the tenant before the plan is even parsed (so an
outsider learns nothing about validation), then for the plan's action class once it is known.
Nothing is written until every check has passed, so a refused submission leaves no trace but
its audit event.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Protocol
from uuid import UUID

import structlog

from opsconductor.actions.planning import (
    DurationEstimate,
    ExecutionMode,
    HandlerLookup,
    decide_mode,
    estimate_duration,
)
from opsconductor.common.approval_policy import (
    LEVEL_STEP_BY_STEP,
    ApprovalPolicy,
    determine_approval_level,
)
from opsconductor.common.auth import Principal
from opsconductor.common.errors import (
    ApprovalLevelNotEnabledError,
    FeatureDisabledError,
    FSMError,
    OpsConductorError,
    QueueUnavailableError,
    WorkerUnavailableError,
)
from opsconductor.common.fsm import ExecutionStatus
from opsconductor.common.hashing import plan_digests, snapshot_hash
from opsconductor.common.plan import Plan, parse_plan, to_wire_dict
from opsconductor.common.secret_catalogue import SecretCatalogue
from opsconductor.common.tenant_policy import TenantPolicies
from opsconductor.common.tracing import current_traceparent
from opsconductor.lifecycle.approval_port import ApprovalLifecycle, PostgresApprovals
from opsconductor.lifecycle.execution_logging import bind_execution_fields
from opsconductor.lifecycle.facade import ExecutionLifecycle
from opsconductor.lifecycle.storage.execution_records import (
    ExecutionRecord,
    PoolOrConnection,
)
from opsconductor.lifecycle.storage.execution_stats import ObservedDurations
from opsconductor.lifecycle.storage.executions import NewExecution
from opsconductor.lifecycle.storage.flags import FlagCache
from opsconductor.lifecycle.storage.policies import TimeoutPolicy, select_policy
from opsconductor.lifecycle.storage.quota_usage import ImmediateUsage, WaitingUsage
from opsconductor.policy.enforcement import enforce_secret_uses, enforce_tenant_policy
from opsconductor.policy.quotas import QuotaLimits, TenantQuotas
from opsconductor.policy.rbac import (
    Authorizer,
    Permission,
    one_request,
    priority_permissions,
    submit_permissions,
)

from .approval_intake import ApprovalIntake
from .ports import WorkerPort

log = structlog.get_logger(__name__)

DEFAULT_PRIORITY = 50
#: The api waits this much longer than the policy for the worker: the worker enforces the policy
#: and reports the timeout itself; this margin only covers transport and bookkeeping.
DISPATCH_MARGIN_S = 15.0


class ActionValidator(HandlerLookup, Protocol):
    """What submission needs of the action registry: lookup plus plan validation."""

    def check_plan(self, plan: Plan) -> None:
        """Raise ``PlanValidationError`` for unknown actions, bad params or class mismatches."""
        ...


@dataclass(frozen=True)
class SubmitRequest:
    tenant_id: str
    plan: Mapping[str, Any]
    requested_mode: ExecutionMode | None = None
    priority: int | None = None
    approval_id: str | None = None
    request_id: str | None = None


@dataclass(frozen=True)
class Decision:
    """Everything decided about a plan before anything is written (PreviewPlan's answer)."""

    plan: Plan
    plan_hash: str
    idempotency_key: str
    policy: TimeoutPolicy
    estimate: DurationEstimate
    mode: ExecutionMode
    approval_level: int
    #: Characters of the plan's canonical JSON (``plan_bytes`` in the log).
    plan_json_length: int

    def snapshot(self) -> dict[str, Any]:
        """The frozen plan plus what was resolved at submit; hashed as ``plan_snapshot_hash``."""
        return {
            "plan": to_wire_dict(self.plan),
            "resolved": {
                "timeout_policy_id": self.policy.id,
                "execution_timeout_ms": self.policy.execution_timeout_ms,
                "step_timeout_ms": self.policy.step_timeout_ms,
                "approval_level": self.approval_level,
                "action_class": str(self.plan.action_class),
                "estimated_duration_ms": self.estimate.wall_ms,
                "can_parallelize": self.estimate.parallel,
                "execution_mode": str(self.mode),
            },
        }


@dataclass(frozen=True)
class SubmitResult:
    execution: ExecutionRecord
    deduplicated: bool
    #: The queue job of a background execution.
    job_id: UUID | None = None
    #: The worker's own answer for an immediate run this request handed over: the finished
    #: execution as the transport carries it, returned as is (``execution`` is then the row as
    #: created, not read again).
    worker_answer: object | None = None


def _unstarted_immediate(record: ExecutionRecord) -> bool:
    return (
        record.execution_mode == ExecutionMode.IMMEDIATE
        and record.status is ExecutionStatus.PENDING
        and record.worker_id is None
    )


class Submissions:
    """The submission use cases of ExecutionService."""

    def __init__(
        self,
        *,
        pool: PoolOrConnection,
        authorizer: Authorizer,
        actions: ActionValidator,
        flags: FlagCache,
        policies: Mapping[str, TimeoutPolicy],
        approval_policy: ApprovalPolicy,
        observed: ObservedDurations,
        worker: WorkerPort,
        lifecycle: ExecutionLifecycle,
        dedup_window: timedelta,
        tenant_policies: TenantPolicies | None = None,
        secret_catalogue: SecretCatalogue | None = None,
        quotas: TenantQuotas | None = None,
        approvals: ApprovalLifecycle | None = None,
    ) -> None:
        """``approvals``: where approval requests are opened and presented ones read (default:
        Postgres, on ``pool``)."""
        self._pool = pool
        #: Where each tenant's secrets may be used; default: empty, no secret may be used.
        self._secret_catalogue = secret_catalogue or SecretCatalogue.empty()
        #: What each tenant's plans may do (shell, egress...); default: the packaged, strictest.
        self._tenant_policies = tenant_policies or TenantPolicies.load()
        #: Per-tenant limits; default: none (the app passes the configured ones).
        self._quotas = quotas or TenantQuotas(QuotaLimits(0, 0, 0), self._tenant_policies)
        self._authorizer = authorizer
        self._actions = actions
        self._flags = flags
        self._policies = policies
        self._approval_policy = approval_policy
        self._observed = observed
        self._worker = worker
        #: Every execution and queue write and read goes through the lifecycle core.
        self._lifecycle = lifecycle
        self._dedup_window = dedup_window
        self._approvals = ApprovalIntake(
            approvals=approvals or PostgresApprovals(pool),
            authorizer=authorizer,
            policy=approval_policy,
        )

    async def decide(
        self,
        principal: Principal,
        tenant_id: str,
        data: Mapping[str, Any],
        requested: ExecutionMode | None,
    ) -> Decision:
        """Validate ``data`` and decide mode, policy, approval level and hashes."""
        plan = parse_plan(data)
        self._actions.check_plan(plan)
        policy = select_policy(self._policies, plan.sla_class, plan.action_class)
        observed = await self._observed.p95_ms(plan.actions)
        estimate = estimate_duration(plan, self._actions, observed)
        level = determine_approval_level(plan, self._approval_policy)
        self._approval_policy.check_runbook(plan, level)
        digests = plan_digests(plan, tenant_id, principal.actor_id)
        return Decision(
            plan=plan,
            plan_hash=digests.plan_hash,
            idempotency_key=digests.idempotency_key,
            policy=policy,
            estimate=estimate,
            # Level 3 waits for a person before every step: far beyond any immediate budget,
            # so it always runs from the queue (the worker gives its lease up while waiting).
            mode=ExecutionMode.BACKGROUND
            if level >= LEVEL_STEP_BY_STEP
            else decide_mode(estimate, requested),
            approval_level=level,
            plan_json_length=digests.canonical_length,
        )

    async def preview(
        self,
        principal: Principal,
        tenant_id: str,
        data: Mapping[str, Any],
        requested: ExecutionMode | None,
    ) -> Decision:
        """What ``submit`` would decide, without executing or writing anything."""
        await self._authorizer.authorize(
            principal,
            tenant_id=tenant_id,
            permissions={Permission.EXECUTIONS_PREVIEW},
            resource="ExecutionService/PreviewPlan",
        )
        return await self.decide(principal, tenant_id, data, requested)

    async def submit(
        self, principal: Principal, token: str, request: SubmitRequest
    ) -> SubmitResult:
        """Create the execution (or find its duplicate) and, if immediate, run it to the end."""
        with one_request():  # the caller's roles are read once for both checks
            return await self._submit(principal, token, request)

    async def _submit(
        self, principal: Principal, token: str, request: SubmitRequest
    ) -> SubmitResult:
        tenant_id = request.tenant_id
        resource = "ExecutionService/SubmitExecution"
        # Priority 0 needs its own permission: refused (and audited), never silently lowered,
        # so a caller always runs at the priority it asked for or learns why not.
        await self._authorizer.authorize(
            principal,
            tenant_id=tenant_id,
            permissions=priority_permissions(request.priority),
            resource=resource,
        )
        flags = await self._flags.get()
        if not flags.stage_e_enabled or not flags.tenant_enabled(tenant_id):
            raise FeatureDisabledError(
                f"Stage E execution is not enabled for tenant {tenant_id!r}", tenant_id=tenant_id
            )
        decision = await self.decide(principal, tenant_id, request.plan, request.requested_mode)
        await self._authorizer.authorize(
            principal,
            tenant_id=tenant_id,
            permissions=submit_permissions(decision.plan.action_class),
            resource=resource,
        )
        await enforce_tenant_policy(
            self._pool,
            self._actions,
            decision.plan,
            self._tenant_policies.for_tenant(tenant_id),
            tier="api",
            tenant_id=tenant_id,
            actor_id=principal.actor_id,
            resource=resource,
        )
        await enforce_secret_uses(
            self._pool,
            self._actions,
            decision.plan,
            self._secret_catalogue,
            tier="api",
            tenant_id=tenant_id,
            principal=principal,
            actor_id=principal.actor_id,
            authorizer=self._authorizer,
            resource=resource,
        )
        if decision.approval_level > flags.max_approval_level:
            raise ApprovalLevelNotEnabledError(
                f"this plan needs approval level {decision.approval_level}; the highest level "
                f"enabled is {flags.max_approval_level}",
                approval_level=decision.approval_level,
                max_approval_level=flags.max_approval_level,
            )
        if request.approval_id is not None:
            await self._approvals.check_presented(
                principal,
                tenant_id=tenant_id,
                approval_id=request.approval_id,
                plan_hash=decision.plan_hash,
                plan_snapshot_hash=snapshot_hash(decision.snapshot()),
            )
        if decision.approval_level > 0:
            return await self._submit_for_approval(
                principal, request, decision, flags.record_only(tenant_id)
            )
        if decision.mode is ExecutionMode.BACKGROUND:
            return await self._submit_background(
                principal, request, decision, flags.record_only(tenant_id)
            )
        # The tenant's quota lock, admission and creation: one statement, atomic by itself.
        record, created = await self._create(
            None, principal, request, decision, flags.record_only(tenant_id), admit=True
        )
        if created or _unstarted_immediate(record):
            # A duplicate of an execution no worker has taken yet hands it over again: its first
            # dispatch may have died with its api. The worker's compare-and-set on ``pending``
            # lets exactly one hand-over run it; the other waits for its outcome below.
            answer = await self._dispatch_immediate(record, token)
            if answer is not None:
                return SubmitResult(record, deduplicated=not created, worker_answer=answer)
        record = await self._lifecycle.get(tenant_id, record.id)
        return SubmitResult(await self._await_duplicate(record), deduplicated=not created)

    async def _submit_background(
        self, principal: Principal, request: SubmitRequest, decision: Decision, record_only: bool
    ) -> SubmitResult:
        """Quota admission, execution, queue row and Redis push in ONE Postgres transaction.

        The admission, the creation and the queueing are one statement; the push happens before
        the commit, so a Redis failure rolls everything back: no phantom execution keeps the
        idempotency key, and the same submit works once Redis is back. A worker dequeuing the
        job before the commit defers it until the row is visible.
        """
        if not self._lifecycle.queue_configured:
            raise QueueUnavailableError("no queue is configured for background execution")
        new = self._new_execution(principal, request, decision, record_only)
        self._bind_plan_size(decision)
        limit = self._quotas.for_tenant(request.tenant_id).max_queued
        async with self._lifecycle.transaction() as conn:
            created = await self._lifecycle.create_queued(
                conn,
                new,
                decision.policy,
                dedup_window=self._dedup_window,
                max_waiting=limit,
                by="api",
            )
            if isinstance(created, WaitingUsage):
                raise self._quotas.queued_refusal(request.tenant_id, limit, created.waiting)
        self._log_created(created.record, created.created, decision)
        if not created.created:
            return SubmitResult(created.record, deduplicated=True, job_id=created.job_id)
        # Committed: wake an idle worker now rather than at its next poll.
        await self._lifecycle.announce()
        return SubmitResult(created.record, deduplicated=False, job_id=created.job_id)

    async def _submit_for_approval(
        self, principal: Principal, request: SubmitRequest, decision: Decision, record_only: bool
    ) -> SubmitResult:
        """Execution and its pending approval request in ONE transaction; returns at once."""
        async with self._lifecycle.transaction() as tx:
            record, created = await self._create(tx, principal, request, decision, record_only)
            if created:
                await self._approvals.open_request(tx, record.id)
            record = await self._lifecycle.get(record.tenant_id, record.id, tx=tx)
        if not created and record.status is not ExecutionStatus.AWAITING_APPROVAL:
            # Already approved: a duplicate of an immediate run in flight gets its outcome.
            record = await self._await_duplicate(record)
        return SubmitResult(record, deduplicated=not created)

    async def _create(
        self,
        tx: Any,
        principal: Principal,
        request: SubmitRequest,
        decision: Decision,
        record_only: bool,
        *,
        admit: bool = False,
    ) -> tuple[ExecutionRecord, bool]:
        """Create the execution (or find its duplicate) in ``tx`` (None: its own statement);
        ``admit``: under the tenant's ``max_immediate`` quota."""
        new = self._new_execution(principal, request, decision, record_only)
        self._bind_plan_size(decision)
        if admit:
            limit = self._quotas.for_tenant(new.tenant_id).max_immediate
            created_or_usage = await self._lifecycle.create_admitted(
                new, dedup_window=self._dedup_window, max_in_flight=limit, tx=tx
            )
            if isinstance(created_or_usage, ImmediateUsage):
                raise self._quotas.immediate_refusal(new.tenant_id, limit, created_or_usage)
            record, created = created_or_usage
        else:
            record, created = await self._lifecycle.create(
                new, dedup_window=self._dedup_window, tx=tx
            )
        self._log_created(record, created, decision)
        return record, created

    def _new_execution(
        self,
        principal: Principal,
        request: SubmitRequest,
        decision: Decision,
        record_only: bool,
    ) -> NewExecution:
        snapshot = decision.snapshot()
        return NewExecution(
            tenant_id=request.tenant_id,
            actor_id=principal.actor_id,
            request_id=request.request_id,
            trace_context=current_traceparent(),
            idempotency_key=decision.idempotency_key,
            plan_hash=decision.plan_hash,
            plan_snapshot=snapshot,
            plan_snapshot_hash=snapshot_hash(snapshot),
            execution_mode=str(decision.mode),
            sla_class=str(decision.plan.sla_class),
            action_class=str(decision.plan.action_class),
            approval_level=decision.approval_level,
            priority=DEFAULT_PRIORITY if request.priority is None else request.priority,
            timeout_policy_id=decision.policy.id,
            timeout_ms=decision.policy.execution_timeout_ms,
            estimated_duration_ms=decision.estimate.wall_ms,
            record_only=record_only,
            steps=[
                (step.id, position, step.action, str(step.action_class))
                for position, step in enumerate(decision.plan.steps)
            ],
        )

    @staticmethod
    def _bind_plan_size(decision: Decision) -> None:
        # On this RPC's records from here on, the lifecycle's execution_created included.
        structlog.contextvars.bind_contextvars(plan_bytes=decision.plan_json_length)

    @staticmethod
    def _log_created(record: ExecutionRecord, created: bool, decision: Decision) -> None:
        bind_execution_fields(record)  # the rest of this RPC's records are the execution's
        if created:
            return  # the lifecycle logged execution_created (one line, not one per layer)
        log.info(
            "execution_deduplicated",
            exec_id=str(record.id),
            tenant_id=record.tenant_id,
            actor_id=record.actor_id,
            plan_hash=record.plan_hash,
            execution_mode=record.execution_mode,
            approval_level=record.approval_level,
            plan_bytes=decision.plan_json_length,
        )

    async def _dispatch_immediate(self, record: ExecutionRecord, token: str) -> object | None:
        """The worker's answer, or None if another hand-over ran it (or it was cancelled)."""
        try:
            return await self._worker.run_immediate(
                tenant_id=record.tenant_id,
                execution_id=record.id,
                token=token,
                timeout_s=record.timeout_ms / 1000 + DISPATCH_MARGIN_S,
            )
        except FSMError:
            # Cancelled, or started by another hand-over, before this one: report its outcome.
            return None
        except Exception as exc:
            # If no worker started it (still pending: unreachable, refused, timed out on a
            # paused worker), nothing ran: end it failed and free the key for a retry. Once a
            # worker has it, the worker records the outcome and this changes nothing.
            reason = exc.reason if isinstance(exc, OpsConductorError) else "DISPATCH_FAILED"
            await self._lifecycle.end_unstarted(
                record.id,
                expected_from=ExecutionStatus.PENDING,
                by="api",
                error_class=reason,
                error_message="no worker could be reached"
                if isinstance(exc, WorkerUnavailableError)
                else f"the worker did not start it ({reason})",
            )
            raise

    async def _await_duplicate(self, record: ExecutionRecord) -> ExecutionRecord:
        """A duplicate of an immediate execution in flight gets its outcome, not a snapshot."""
        if record.execution_mode != ExecutionMode.IMMEDIATE or record.is_terminal:
            return record
        deadline = time.monotonic() + record.timeout_ms / 1000 + DISPATCH_MARGIN_S
        delay = 0.02
        while time.monotonic() < deadline:
            await asyncio.sleep(delay)
            record = await self._lifecycle.get(record.tenant_id, record.id)
            if record.is_terminal:
                break
            delay = min(delay * 2, 0.5)
        return record
