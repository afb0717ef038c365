"""Enforcing a tenant's policy on a plan: the same check, audited, in the api and the worker.

The api refuses a plan its tenant's policy forbids before anything is written; the worker runs
the same check again before the first step (it never trusts what the api decided, and its own
copy of the policy may be stricter). Each handler judges its own steps through an optional
``policy_violations(params, tenant_policy)`` method (``shell``: enabled, executable
allow-list, interpreters, pass-through variables). A refusal is `TenantPolicyDeniedError`
(``PERMISSION_DENIED``) naming the field paths, and is audited like every denial: an
``rbac_violation`` event with reason ``TENANT_POLICY`` under the tenant (its own transaction),
the ``opsc_rbac_violations_total`` counter and a warning log line.

Secret uses are enforced the same way (`enforce_secret_uses`): every ``$secret`` reference of a
step must be allowed by the tenant's secret catalogue for that step's action and destination
(the handler's optional ``secret_destination(params)``: the URL of ``http``, the program of
``shell``). A refusal is `SecretUseDeniedError` (``PERMISSION_DENIED``, reason
``SECRET_USE_DENIED``) naming the field paths, with the same words whether the secret is not
catalogued at all or not for this use; it is audited through the `Authorizer` when one is given
(the api: the per-principal denial budget), else written directly (the worker's re-check).
"""

from __future__ import annotations

import asyncio
from typing import NoReturn
from uuid import UUID

import asyncpg
import structlog

from opsconductor.actions.planning import HandlerLookup
from opsconductor.common.auth import Principal
from opsconductor.common.errors import (
    FieldViolation,
    SecretUseDeniedError,
    StorageError,
)
from opsconductor.common.plan import Plan, Step
from opsconductor.common.secret_catalogue import SecretCatalogue
from opsconductor.common.secrets import SecretUse, find_secret_refs
from opsconductor.common.tenant_policy import TenantPolicy, TenantPolicyDeniedError
from opsconductor.lifecycle.storage.audit import record_rbac_violation
from opsconductor.policy.rbac import RBAC_VIOLATIONS, Authorizer, DenialReason, Tier

__all__ = [
    "SecretUseDeniedError",
    "enforce_secret_uses",
    "enforce_tenant_policy",
    "plan_policy_violations",
    "plan_secret_use_violations",
    "step_secret_use",
]

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


def step_secret_use(handlers: HandlerLookup, step: Step, tenant_id: str) -> SecretUse:
    """Who uses ``step``'s secrets for what: tenant, action and the handler's destination."""
    destination = None
    find = getattr(handlers.get(step.action), "secret_destination", None)
    if callable(find):
        try:
            found = find(step.params)
        except Exception as exc:  # noqa: BLE001 - a plugin's bug must refuse, not crash
            log.error("secret_destination_failed", action=step.action, error=type(exc).__name__)
            found = None
        destination = found if isinstance(found, str) else None
    return SecretUse(tenant_id=tenant_id, action=step.action, destination=destination)


def plan_secret_use_violations(
    handlers: HandlerLookup, plan: Plan, catalogue: SecretCatalogue, tenant_id: str
) -> list[FieldViolation]:
    """Every secret reference of ``plan`` the catalogue does not allow where it is used."""
    found: list[FieldViolation] = []
    for index, step in enumerate(plan.steps):
        refs = find_secret_refs(step.params, path=f"steps[{index}].params")
        if not refs:
            continue
        use = step_secret_use(handlers, step, tenant_id)
        for where, ref in refs:
            if not catalogue.allows(tenant_id, ref, use.action, use.destination):
                found.append(
                    FieldViolation(
                        where,
                        f"secret {ref} is not available to this step: the tenant's secret "
                        f"catalogue does not allow it for action {step.action!r} with this "
                        "destination",
                    )
                )
    return found[:_MAX_REPORTED]


async def enforce_secret_uses(
    pool: asyncpg.Pool,
    handlers: HandlerLookup,
    plan: Plan,
    catalogue: SecretCatalogue,
    *,
    tier: Tier,
    tenant_id: str,
    principal: Principal | None = None,
    actor_id: str = "",
    authorizer: Authorizer | None = None,
    execution_id: UUID | None = None,
    resource: str = "",
) -> None:
    """Return if the catalogue allows every secret use of ``plan``; else audit and raise.

    With ``authorizer`` and ``principal`` the row goes through the principal's denial budget;
    otherwise it is written directly under ``actor_id``.
    """
    violations = plan_secret_use_violations(handlers, plan, catalogue, tenant_id)
    if not violations:
        return
    reason = DenialReason.SECRET_USE_DENIED
    audited = [{"field": v.field, "description": v.description} for v in violations]
    if authorizer is not None and principal is not None:
        await authorizer.record_denial(
            principal,
            tenant_id=tenant_id,
            reason=reason,
            resource=resource,
            execution_id=execution_id,
            details={"violations": audited},
        )
    else:
        await _audit(
            pool,
            {"reason": reason.value, "tier": tier, "resource": resource, "violations": audited},
            tier=tier,
            tenant_id=tenant_id,
            actor_id=actor_id,
            execution_id=execution_id,
        )
    first = violations[0]
    more = f" (and {len(violations) - 1} more)" if len(violations) > 1 else ""
    raise SecretUseDeniedError(
        f"{first}{more}",
        denial_reason=reason.value,
        field=first.field,
        fields=", ".join(v.field for v in violations),
    )


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
    await _audit(
        pool, payload, tier=tier, tenant_id=tenant_id, actor_id=actor_id, execution_id=execution_id
    )
    first = violations[0]
    more = f" (and {len(violations) - 1} more)" if len(violations) > 1 else ""
    raise TenantPolicyDeniedError(
        f"refused by the tenant policy: {first}{more}",
        denial_reason=reason,
        field=first.field,
        fields=", ".join(v.field for v in violations),
    )


async def _audit(
    pool: asyncpg.Pool,
    payload: dict[str, object],
    *,
    tier: Tier,
    tenant_id: str,
    actor_id: str,
    execution_id: UUID | None,
) -> None:
    """Counter, log line and the row (shielded: a cancelled caller still leaves it)."""
    RBAC_VIOLATIONS.labels(tier=tier, reason=str(payload["reason"])).inc()
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
