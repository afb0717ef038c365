"""Timeout policies: the SLA × action-class table every execution's time budget comes from.

``timeout_policies`` holds one row per allowed combination (DESIGN.md §3: six of them). A plan
whose combination has no row is rejected as invalid input, naming the combinations that exist,
rather than run under a guessed budget.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from opsconductor.common.errors import FieldViolation, PlanValidationError
from opsconductor.lifecycle.storage.execution_records import PoolOrConnection, transaction
from opsconductor.lifecycle.storage.queries import query

__all__ = ["TimeoutPolicy", "load_timeout_policies", "select_policy"]

_SELECT = query("load_timeout_policies")
# Presentation order of the allowed combinations in error messages.
_SLA_ORDER = {"fast": 0, "medium": 1, "long": 2}
_ACTION_ORDER = {"read": 0, "modify": 1, "deploy": 2}


@dataclass(frozen=True)
class TimeoutPolicy:
    """One row of ``timeout_policies``: the budget of an SLA class for an action class."""

    id: str
    sla_class: str
    action_class: str
    execution_timeout_ms: int
    step_timeout_ms: int
    max_attempts: int
    max_lease_renewals: int
    lease_buffer_ms: int

    @property
    def combination(self) -> str:
        """``"{sla_class}+{action_class}"``, as error messages name it."""
        return f"{self.sla_class}+{self.action_class}"


async def load_timeout_policies(db: PoolOrConnection) -> dict[str, TimeoutPolicy]:
    """Every timeout policy, by id."""
    async with transaction(db) as conn:
        rows = await conn.fetch(_SELECT)
    return {row["id"]: TimeoutPolicy(**dict(row)) for row in rows}


def select_policy(
    policies: Mapping[str, TimeoutPolicy], sla_class: str, action_class: str
) -> TimeoutPolicy:
    """The policy for ``sla_class`` × ``action_class``.

    Raises :class:`PlanValidationError` on field ``sla_class`` listing the allowed combinations
    when there is none (e.g. ``fast`` with a ``deploy`` step).
    """
    sla, action = str(sla_class), str(action_class)
    for policy in policies.values():
        if policy.sla_class == sla and policy.action_class == action:
            return policy
    allowed = ", ".join(
        policy.combination
        for policy in sorted(
            policies.values(),
            key=lambda p: (
                _SLA_ORDER.get(p.sla_class, len(_SLA_ORDER)),
                _ACTION_ORDER.get(p.action_class, len(_ACTION_ORDER)),
                p.id,
            ),
        )
    )
    description = (
        f"no timeout policy for sla_class {sla[:40]!r} with action_class {action[:40]!r}; "
        f"allowed combinations (sla_class+action_class): {allowed or 'none configured'}"
    )
    raise PlanValidationError(
        violations=[FieldViolation("sla_class", description)],
        sla_class=sla[:40],
        action_class=action[:40],
    )
