"""The worker's service logic over the in-memory lifecycle, for unit tests: the real
``ExecutionRunner`` and ``BackgroundConsumer``, a scripted action whose steps succeed, fail,
hang or run a hook, and the real authorizer with its role bindings given instead of read from
Postgres (its denials kept in a list instead of the audit table)."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import replace
from datetime import timedelta
from typing import Any
from uuid import UUID, uuid4

from opsconductor.actions.base import ActionContext, ActionFailedError, ActionHandler, ActionResult
from opsconductor.common.auth import Principal
from opsconductor.common.errors import FieldViolation
from opsconductor.common.hashing import plan_hash
from opsconductor.common.plan import ActionClass, parse_plan, to_wire_dict
from opsconductor.common.secrets import SecretResolver
from opsconductor.common.tenant_policy import TenantPolicies
from opsconductor.lifecycle.fake import InMemoryLifecycle
from opsconductor.lifecycle.storage.cancellation import CancelSignals
from opsconductor.lifecycle.storage.execution_records import ExecutionRecord
from opsconductor.lifecycle.storage.executions import NewExecution
from opsconductor.lifecycle.storage.policies import TimeoutPolicy
from opsconductor.policy.rbac import Authorizer, DenialReason, RbacPolicy
from opsconductor.worker.logic.consumer import BackgroundConsumer
from opsconductor.worker.logic.runner import ExecutionRunner

TENANT = "t1"
WORKER = "w1"
TARGET = "host:one"
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

Hook = Callable[[], Awaitable[None]]


class Scripted:
    """The ``scripted`` action: each step does what its ``do`` param says (``ok``, ``fail``,
    ``crash``, ``hang``), after its hook (by step id) if it has one; every call is counted."""

    name = "scripted"
    min_action_class = ActionClass.READ

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.hooks: dict[str, Hook] = {}

    def estimate_ms(self, params: Mapping[str, Any], target_count: int) -> int:
        return 5

    def validate(self, params: Mapping[str, Any]) -> list[FieldViolation]:
        return []

    async def run(self, ctx: ActionContext) -> ActionResult:
        self.calls.append(ctx.step_id)
        hook = self.hooks.get(ctx.step_id)
        if hook is not None:
            await hook()
        do = ctx.params.get("do", "ok")
        if do == "fail":
            raise ActionFailedError("the target said no")
        if do == "crash":
            raise RuntimeError("a bug in the handler")
        if do == "hang":
            await asyncio.Event().wait()  # until the step's or the execution's budget ends
        return ActionResult({"ok": True, "step": ctx.step_id})


class Handlers:
    def __init__(self, scripted: Scripted) -> None:
        self._scripted = scripted

    def get(self, name: str) -> ActionHandler:
        assert name == "scripted", name
        return self._scripted


class Roles(Authorizer):
    """The real authorizer, its role bindings given instead of read from Postgres and its
    denials kept here instead of the audit table."""

    def __init__(self, bindings: dict[tuple[str, str], frozenset[str]]) -> None:
        super().__init__(None, RbacPolicy.load(), tier="worker")  # type: ignore[arg-type]
        self.bindings = bindings
        self.denials: list[tuple[str, DenialReason]] = []

    async def roles_for(self, principal: Principal, tenant_id: str) -> frozenset[str]:
        if principal.tenant_id != tenant_id:
            return frozenset()
        return self.bindings.get((tenant_id, principal.actor_id), frozenset())

    async def record_denial(
        self,
        principal: Principal,
        *,
        tenant_id: str,
        reason: DenialReason,
        resource: str = "",
        execution_id: UUID | None = None,
        details: Mapping[str, Any] | None = None,
    ) -> None:
        self.denials.append((principal.actor_id, reason))


def plan_of(*steps: str, name: str = "scripted") -> dict[str, Any]:
    """A plan of ``scripted`` steps, one per ``do`` given, on one target (so they run in order)."""
    return {
        "name": f"{name}-{uuid4().hex[:8]}",
        "sla_class": "fast",
        "steps": [
            {
                "id": f"s{index}",
                "action": "scripted",
                "action_class": "read",
                "targets": [{"ref": TARGET}],
                "params": {"do": do},
            }
            for index, do in enumerate(steps, start=1)
        ],
    }


def new_execution(
    plan_dict: dict[str, Any], *, mode: str = "background", timeout_ms: int = 10_000
) -> NewExecution:
    plan = parse_plan(plan_dict)
    return NewExecution(
        tenant_id=TENANT,
        actor_id="alice",
        request_id="req-1",
        idempotency_key=hashlib.sha256(uuid4().bytes).hexdigest(),
        plan_hash=plan_hash(plan),
        plan_snapshot={"plan": to_wire_dict(plan), "resolved": {}},
        plan_snapshot_hash="c" * 64,
        execution_mode=mode,
        sla_class="fast",
        action_class="read",
        approval_level=0,
        priority=50,
        timeout_policy_id=POLICY.id,
        timeout_ms=timeout_ms,
        estimated_duration_ms=10,
        record_only=False,
        steps=[(step.id, index, step.action, "read") for index, step in enumerate(plan.steps)],
    )


class World:
    """One worker over one in-memory lifecycle."""

    def __init__(self, *, step_timeout_ms: int = POLICY.step_timeout_ms) -> None:
        self.lifecycle = InMemoryLifecycle()
        self.advance(0)  # the queue's clock stands still until a test moves it
        self.scripted = Scripted()
        self.roles = Roles({(TENANT, "alice"): frozenset({"operator"})})
        self.policy = replace(POLICY, step_timeout_ms=step_timeout_ms)
        # The timeout_policies table the worker's policies were loaded from.
        self.lifecycle.policies = {POLICY.id: self.policy}
        self.runner = ExecutionRunner(
            lifecycle=self.lifecycle,
            pool=None,  # type: ignore[arg-type]  # only a tenant policy's refusal audits
            handlers=Handlers(self.scripted),
            secrets=SecretResolver([]),
            cancel_signals=CancelSignals("postgresql://unused"),  # never started: no LISTEN
            policies={POLICY.id: self.policy},
            worker_id=WORKER,
            tenant_policies=TenantPolicies.load(),
        )
        self.consumer = BackgroundConsumer(
            lifecycle=self.lifecycle,
            runner=self.runner,
            authorizer=self.roles,
            policies={POLICY.id: self.policy},
            worker_id=WORKER,
            concurrency=2,
        )

    async def immediate(self, *steps: str, timeout_ms: int = 10_000) -> ExecutionRecord:
        record, created = await self.lifecycle.create(
            new_execution(plan_of(*steps), mode="immediate", timeout_ms=timeout_ms),
            dedup_window=timedelta(hours=1),
        )
        assert created
        return record

    async def queued(self, *steps: str, timeout_ms: int = 10_000) -> tuple[ExecutionRecord, UUID]:
        """A background execution submitted: created, queued, its job in Redis."""
        record, _ = await self.lifecycle.create(
            new_execution(plan_of(*steps), timeout_ms=timeout_ms),
            dedup_window=timedelta(hours=1),
        )
        async with self.lifecycle.transaction() as tx:
            queued = await self.lifecycle.enqueue(
                tx, record, self.policy, by="api", expected_from=record.status
            )
        return queued.record, queued.job_id

    def advance(self, seconds: float) -> None:
        """Move the queue's clock on (backoffs, delays and leases run on it)."""
        now = self.lifecycle.clock() + seconds
        self.lifecycle.clock = lambda: now

    def steps(self, execution_id: UUID) -> dict[str, str]:
        return {s.step_id: s.status.value for s in self.lifecycle.records[execution_id].steps}
