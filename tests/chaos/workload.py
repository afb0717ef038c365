"""The soak's workload: a seeded list of plans, and the driver that submits them through the
public gRPC API only (the typed client), recording what every call answered.

Kinds of operation (one "op" is one logical plan; its ``op`` param makes it unique)::

    immediate   1-3 short read steps, run synchronously
    background  1-3 read steps queued at priority 0, 50 or 100
    long        3 background steps of 1.5-2 s: a worker paused in one comes back while its
                successor still runs the plan (what fencing is for)
    duplicate   an immediate or background plan submitted 2-5 times at once (a browser refresh)
    cancel      a background plan of long steps, cancelled while it runs
    retry       a background plan whose step fails once, then succeeds on the retry
    dlq         a background plan whose step always fails: retried into the dead-letter queue
    approve     a modify plan (approval level 1), approved by another principal
    reject      the same, rejected
    resubmit    the same, then submitted again *changed* with the old approval id (refused, and
                the pending request invalidated), then submitted anew and approved

Targets come from a small pool per tenant, so the per-target mutex is contended. Every step
references the secret (``{"$secret": "env:CHAOS_TOKEN"}``). A call that fails for a transient
reason (the api or Redis down, the service starting) is retried with the same plan, which the
idempotency key makes safe; every answer is counted in :class:`OpOutcome`.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from opsconductor.client import (
    ApprovalClient,
    ApprovalInvalidatedError,
    Execution,
    ExecutionClient,
    OpsConductorError,
    PermissionDeniedError,
    QueueUnavailableError,
    RpcError,
)
from opsconductor.common.errors import StorageError, WorkerUnavailableError

from .stack import APPROVER, DRIVER, SECRET_NAME, TENANTS, ChaosStack

KIND_WEIGHTS = {
    "immediate": 26,
    "background": 22,
    "long": 10,
    "duplicate": 12,
    "cancel": 8,
    "retry": 6,
    "dlq": 4,
    "approve": 6,
    "reject": 4,
    "resubmit": 4,
}
TARGETS_PER_TENANT = 10
#: How long a call keeps being retried while the api, a worker or Redis is down.
RETRY_FOR_S = 60.0
TERMINAL = frozenset({"succeeded", "failed", "cancelled", "rejected"})


@dataclass(frozen=True)
class Op:
    """One logical plan of the workload and how the driver treats it."""

    id: str
    kind: str
    tenant: str
    plan: dict[str, Any]
    mode: str
    priority: int
    copies: int
    #: Seconds after the workload's start at which it is submitted.
    at_s: float
    cancel_after_s: float = 0.0


@dataclass
class OpOutcome:
    """What the API answered for one op."""

    op: Op
    execution_ids: set[str] = field(default_factory=set)
    errors: Counter[str] = field(default_factory=Counter)
    #: Submits that never got an answer other than a transient failure.
    gave_up: int = 0


@dataclass
class CrossTenantAttempt:
    """An intruder of tenant A acting on tenant B; it must be refused and audited."""

    actor: str
    action: str
    succeeded: bool = False
    denied: bool = False
    error: str = ""


def _effect_step(
    rng: random.Random, op_id: str, index: int, targets: list[str], **params: Any
) -> dict[str, Any]:
    return {
        "id": f"s{index}",
        "action": "chaos_effect",
        "action_class": params.pop("action_class", "read"),
        "targets": [{"ref": t} for t in rng.sample(targets, rng.randint(1, 2))],
        "params": {"op": op_id, "token": {"$secret": f"env:{SECRET_NAME}"}, **params},
    }


def build_workload(seed: int, plans: int, window_s: float) -> list[Op]:
    """``plans`` ops spread over ``window_s`` seconds; the same seed gives the same list."""
    rng = random.Random(f"workload:{seed}")
    kinds = list(KIND_WEIGHTS)
    weights = list(KIND_WEIGHTS.values())
    ops = []
    for i in range(plans):
        # The first ops cover every kind, so even a small run has each.
        kind = kinds[i] if i < len(kinds) else rng.choices(kinds, weights)[0]
        tenant = TENANTS[i % 2]
        targets = [f"host-{tenant}-{n}" for n in range(TARGETS_PER_TENANT)]
        op_id = f"op-{seed}-{i}"
        steps = rng.randint(1, 3)
        sla = "fast"
        mode = "background"
        copies = 1
        cancel_after = 0.0
        step_params: dict[str, Any] = {"hold_s": round(rng.uniform(0.05, 0.4), 2)}
        if kind == "immediate" or (kind == "duplicate" and rng.random() < 0.5):
            mode = "immediate"
        else:
            # Long enough that workers are mid-job when a fault strikes.
            sla = "medium"
            step_params = {"hold_s": round(rng.uniform(0.3, 1.2), 2)}
        if kind == "duplicate":
            copies = rng.randint(2, 5)
        elif kind == "long":
            steps = 3
            step_params = {"hold_s": round(rng.uniform(1.5, 2.0), 2)}
        elif kind == "cancel":
            steps = 3
            step_params = {"hold_s": 1.5}
            cancel_after = round(rng.uniform(0.3, 2.5), 2)
        elif kind in ("retry", "dlq"):
            steps = 1
            sla = "fast"  # 3 attempts: a dead letter within seconds
            if kind == "retry":
                step_params["fail_times"] = 1
            else:
                step_params["fail"] = True
        elif kind in ("approve", "reject", "resubmit"):
            step_params["action_class"] = "modify"
            mode = rng.choice(["immediate", "background"])
            sla = "fast" if mode == "immediate" else "medium"
        plan = {
            "name": f"chaos {kind} {op_id}",
            "sla_class": sla,
            "steps": [
                _effect_step(rng, op_id, n, targets, **dict(step_params))
                for n in range(1, steps + 1)
            ],
        }
        ops.append(
            Op(
                id=op_id,
                kind=kind,
                tenant=tenant,
                plan=plan,
                mode=mode,
                priority=rng.choice([0, 50, 100]),
                copies=copies,
                at_s=round(window_s * i / max(plans, 1) + rng.uniform(0, 0.5), 2),
                cancel_after_s=cancel_after,
            )
        )
    return ops


def _error_name(exc: OpsConductorError) -> str:
    """``ResourceBusyError``, or ``RpcError:UNAVAILABLE`` for an unmapped status."""
    code = exc.details.get("code")
    return f"{type(exc).__name__}:{code}" if isinstance(exc, RpcError) else type(exc).__name__


def _transient(exc: Exception) -> bool:
    """A failure worth retrying the same call for: the service (or Redis) was not there."""
    if isinstance(exc, QueueUnavailableError | StorageError | WorkerUnavailableError):
        return True
    return isinstance(exc, RpcError) and exc.details.get("code") in ("UNAVAILABLE", "CANCELLED")


class WorkloadDriver:
    """Runs ops against the stack through the typed clients; collects :class:`OpOutcome`."""

    def __init__(self, stack: ChaosStack, *, concurrency: int = 24) -> None:
        self._stack = stack
        self._gate = asyncio.Semaphore(concurrency)
        self.outcomes: list[OpOutcome] = []
        self.cross_tenant: list[CrossTenantAttempt] = []
        self._clients: dict[tuple[str, str], ExecutionClient] = {}
        self._approvers: dict[str, ApprovalClient] = {}

    def client(self, tenant: str, actor: str = DRIVER) -> ExecutionClient:
        key = (tenant, actor)
        if key not in self._clients:
            self._clients[key] = ExecutionClient(
                self._stack.address("api"), self._stack.token(actor, tenant)
            )
        return self._clients[key]

    def approver(self, tenant: str) -> ApprovalClient:
        if tenant not in self._approvers:
            self._approvers[tenant] = ApprovalClient(
                self._stack.address("approvals"), self._stack.token(APPROVER, tenant)
            )
        return self._approvers[tenant]

    async def close(self) -> None:
        for client in [*self._clients.values(), *self._approvers.values()]:
            await client.close()

    async def run(self, ops: list[Op], started: float) -> None:
        """Submit every op at its time (bounded concurrency) and follow it through."""

        async def one(op: Op) -> None:
            await asyncio.sleep(max(0.0, started + op.at_s - time.monotonic()))
            outcome = OpOutcome(op)
            self.outcomes.append(outcome)
            async with self._gate:
                await self._run_op(outcome)

        await asyncio.gather(*(one(op) for op in ops))

    async def _call(self, outcome: OpOutcome, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)``, retried while the failure is transient; None if it never
        worked (the error is counted either way)."""
        deadline = time.monotonic() + RETRY_FOR_S
        delay = 0.2
        while True:
            try:
                return await fn(*args, **kwargs)
            except OpsConductorError as exc:
                outcome.errors[_error_name(exc)] += 1
                if not _transient(exc) or time.monotonic() > deadline:
                    if _transient(exc):
                        outcome.gave_up += 1
                    return None
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    async def _submit(
        self, outcome: OpOutcome, plan: dict[str, Any], approval_id: str | None = None
    ) -> Execution | None:
        op = outcome.op
        execution: Execution | None = await self._call(
            outcome,
            self.client(op.tenant).submit,
            plan,
            tenant_id=op.tenant,
            requested_mode=op.mode,
            priority=op.priority,
            approval_id=approval_id,
        )
        if execution is not None:
            outcome.execution_ids.add(execution.execution_id)
        return execution

    async def _run_op(self, outcome: OpOutcome) -> None:
        op = outcome.op
        if op.copies > 1:
            await asyncio.gather(*(self._submit(outcome, op.plan) for _ in range(op.copies)))
            return
        if op.kind in ("approve", "reject", "resubmit"):
            await self._run_approval(outcome)
            return
        execution = await self._submit(outcome, op.plan)
        if execution is not None and op.kind == "cancel":
            await asyncio.sleep(op.cancel_after_s)
            await self._call(
                outcome,
                self.client(op.tenant).cancel,
                execution.execution_id,
                tenant_id=op.tenant,
                reason="chaos: cancelled mid-run",
            )

    async def _run_approval(self, outcome: OpOutcome) -> None:
        op = outcome.op
        execution = await self._submit(outcome, op.plan)
        if execution is None or execution.approval_id is None:
            return
        approvals = self.approver(op.tenant)
        if op.kind == "reject":
            await self._call(outcome, approvals.reject, execution.approval_id, tenant_id=op.tenant)
            return
        approval_id = execution.approval_id
        if op.kind == "resubmit":
            changed = {**op.plan, "name": op.plan["name"] + " (changed)"}
            try:
                await self.client(op.tenant).submit(
                    changed,
                    tenant_id=op.tenant,
                    requested_mode=op.mode,
                    approval_id=approval_id,
                )
                outcome.errors["changed plan accepted with the old approval"] += 1
            except ApprovalInvalidatedError:
                pass
            except OpsConductorError as exc:
                outcome.errors[_error_name(exc)] += 1
            anew = await self._submit(outcome, changed)
            if anew is None or anew.approval_id is None:
                return
            approval_id = anew.approval_id
        await self._call(outcome, approvals.approve, approval_id, tenant_id=op.tenant)

    async def attack(self, index: int, victim_execution: str | None) -> None:
        """One cross-tenant attempt by a fresh intruder of tenant A against tenant B."""
        actor = f"intruder-{index}"
        victim = TENANTS[1]
        action = ("submit", "get", "cancel", "list")[index % 4]
        attempt = CrossTenantAttempt(actor=actor, action=action)
        self.cross_tenant.append(attempt)
        client = self.client(TENANTS[0], actor)
        target = victim_execution or str(uuid.uuid4())
        plan = {
            "name": f"chaos intrusion {index}",
            "sla_class": "fast",
            "steps": [
                {
                    "id": "s1",
                    "action": "chaos_effect",
                    "action_class": "read",
                    "targets": [{"ref": f"host-{victim}-0"}],
                    "params": {"op": f"intrusion-{index}"},
                }
            ],
        }
        deadline = time.monotonic() + RETRY_FOR_S
        while True:
            try:
                if action == "submit":
                    await client.submit(plan, tenant_id=victim)
                elif action == "get":
                    await client.get(target, tenant_id=victim)
                elif action == "cancel":
                    await client.cancel(target, tenant_id=victim)
                else:
                    await client.list_executions(tenant_id=victim)
                attempt.succeeded = True
                return
            except PermissionDeniedError:
                attempt.denied = True
                return
            except OpsConductorError as exc:
                attempt.error = type(exc).__name__
                if not _transient(exc) or time.monotonic() > deadline:
                    return
            await asyncio.sleep(0.5)
