"""Enforcing a tenant's policy on a plan: the same check, audited, in the api and the worker.

The api refuses a plan its tenant's policy forbids before anything is written; the worker runs
the same check again before the first step (it never trusts what the api decided, and its own
copy of the policy may be stricter). Each handler judges its own steps through an optional
``policy_violations(params, tenant_policy)`` method (``shell``: enabled, executable
allow-list, interpreters, pass-through variables). A refusal is `TenantPolicyDeniedError`
(``PERMISSION_DENIED``) naming the field paths, and is audited like every denial: an
``rbac_violation`` event with reason ``TENANT_POLICY`` under the tenant (its own transaction),
the ``opsc_rbac_violations_total`` counter and a warning log line.
"""

from __future__ import annotations

import asyncio
from typing import NoReturn
from uuid import UUID

import asyncpg
import structlog

from opsconductor.common.errors import FieldViolation, StorageError
from opsconductor.common.plan import Plan
from opsconductor.common.planning import HandlerLookup
from opsconductor.common.rbac import RBAC_VIOLATIONS, DenialReason, Tier
from opsconductor.common.storage.audit import record_rbac_violation
from opsconductor.common.tenant_policy import TenantPolicy, TenantPolicyDeniedError

__all__ = ["enforce_tenant_policy", "plan_policy_violations"]

log = structlog.get_logger(__name__)

#: At most this many violations are reported (and audited) per refusal.
_MAX_REPORTED = 20
# Strong references to in-flight audit writes (see rbac.py: a shielded task must not be lost).
_PENDING: set[asyncio.Task[None]] = set()


def plan_policy_violations(
    handlers: HandlerLookup, plan: Plan, policy: TenantPolicy
) -> list[FieldViolation]:
    """Every step of ``plan`` the policy refuses, fields prefixed ``steps[i]``."""
    found: list[FieldViolation] = []
    for index, step in enumerate(plan.steps):
        check = getattr(handlers.get(step.action), "policy_violations", None)
        if not callable(check):
            continue
        try:
            violations = check(step.params, policy)
        except Exception as exc:  # noqa: BLE001 - a plugin's bug must refuse, not crash
            log.error("action_policy_check_failed", action=step.action, error=type(exc).__name__)
            violations = [FieldViolation("params", "could not be checked against the policy")]
        found += [FieldViolation(f"steps[{index}].{v.field}", v.description) for v in violations]
    return found[:_MAX_REPORTED]


async def enforce_tenant_policy(
    pool: asyncpg.Pool,
    handlers: HandlerLookup,
    plan: Plan,
    policy: TenantPolicy,
    *,
    tier: Tier,
    tenant_id: str,
    actor_id: str,
    execution_id: UUID | None = None,
    resource: str = "",
) -> None:
    """Return if ``policy`` allows ``plan``; otherwise audit the refusal and raise it."""
    violations = plan_policy_violations(handlers, plan, policy)
    if violations:
        await _deny(pool, violations, tier, tenant_id, actor_id, execution_id, resource)


async def _deny(
    pool: asyncpg.Pool,
    violations: list[FieldViolation],
    tier: Tier,
    tenant_id: str,
    actor_id: str,
    execution_id: UUID | None,
    resource: str,
) -> NoReturn:
    reason = DenialReason.TENANT_POLICY.value
    payload: dict[str, object] = {
        "reason": reason,
        "tier": tier,
        "resource": resource,
        # Paths and the policy setting involved; never a submitted value.
        "violations": [{"field": v.field, "description": v.description} for v in violations],
    }
    RBAC_VIOLATIONS.labels(tier=tier, reason=reason).inc()
    log.warning(
        "rbac_violation",
        tenant_id=tenant_id,
        actor_id=actor_id,
        execution_id=str(execution_id) if execution_id else None,
        **payload,
    )
    task = asyncio.ensure_future(_record(pool, tenant_id, actor_id, execution_id, payload))
    _PENDING.add(task)
    task.add_done_callback(_PENDING.discard)
    await asyncio.shield(task)
    first = violations[0]
    more = f" (and {len(violations) - 1} more)" if len(violations) > 1 else ""
    raise TenantPolicyDeniedError(
        f"refused by the tenant policy: {first}{more}",
        denial_reason=reason,
        field=first.field,
        fields=", ".join(v.field for v in violations),
    )


async def _record(
    pool: asyncpg.Pool,
    tenant_id: str,
    actor_id: str,
    execution_id: UUID | None,
    payload: dict[str, object],
) -> None:
    try:
        await record_rbac_violation(
            pool, tenant_id=tenant_id, actor_id=actor_id, execution_id=execution_id, payload=payload
        )
    except StorageError:
        log.exception("rbac_violation_record_failed", tenant_id=tenant_id, tier=payload["tier"])
