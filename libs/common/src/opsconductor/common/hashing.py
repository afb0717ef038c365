"""Canonical JSON and the hashes built on it: plan hash, idempotency keys, snapshot hash.

Two logically identical plans must hash the same, whoever built them and however their JSON was
ordered, because the hash decides deduplication (``idempotency_key``) and what an approval is
bound to (``plan_hash``, ``plan_snapshot_hash``). The canonical form (spec §3.1, DESIGN.md §3):

* object keys sorted, no whitespace (separators ``","`` and ``":"``), UTF-8 text
  (``ensure_ascii=False``), NaN and infinities refused;
* every list under a key named ``targets`` sorted by the canonical JSON of its items, at any
  depth, because the set of targets a step acts on has no meaningful order;
* every other list, the plan's ``steps`` above all, kept in its order, which is semantic.

The ``targets`` rule is applied by key name, so it also reorders a list a step's ``params`` keeps
under a ``targets`` key: two plans differing only in that order hash the same.

Only JSON values (dicts with string keys, lists, tuples, strings, numbers, booleans, ``None``)
and pydantic models (dumped in JSON mode) are accepted; anything else raises ``TypeError``
rather than being stringified into a hash nobody can reproduce.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, NamedTuple
from uuid import UUID

from pydantic import BaseModel

if TYPE_CHECKING:
    from opsconductor.common.plan import Plan

__all__ = [
    "SORTED_LIST_KEY",
    "PlanDigests",
    "canonical_json",
    "idempotency_key",
    "plan_digests",
    "plan_hash",
    "snapshot_hash",
    "step_idempotency_key",
]

#: Lists under this key are sets: their order is not part of the canonical form.
SORTED_LIST_KEY = "targets"

_SCALARS = (str, int, float, bool, type(None))


def _dumps(value: Any) -> str:
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )


def _normalize(value: Any, *, unordered: bool = False) -> Any:
    """Plain JSON data with every ``targets`` list sorted; ``unordered`` marks such a list."""
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    if isinstance(value, _SCALARS):
        return value
    if isinstance(value, Mapping):
        normalized: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"canonical JSON needs string keys, got {type(key).__name__}")
            normalized[key] = _normalize(item, unordered=key == SORTED_LIST_KEY)
        return normalized
    if isinstance(value, list | tuple):
        items = [_normalize(item) for item in value]
        if unordered:
            # Items are already normalized, so _dumps gives each one's canonical text.
            items.sort(key=_dumps)
        return items
    raise TypeError(f"canonical JSON cannot encode a {type(value).__name__}")


def canonical_json(value: Any) -> str:
    """The canonical JSON text of ``value`` (see the module docstring for the rules).

    Raises ``TypeError`` for non-JSON values and ``ValueError`` for NaN or infinities.
    """
    return _dumps(_normalize(value))


def _sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _plan_wire(plan: Plan | Mapping[str, Any]) -> dict[str, Any]:
    # Imported here, not at the top: plan.py measures its size limits with canonical_json.
    from opsconductor.common.plan import Plan, parse_plan, to_wire_dict

    if isinstance(plan, Plan):
        return to_wire_dict(plan)
    if isinstance(plan, Mapping):
        return to_wire_dict(parse_plan(plan))
    raise TypeError(f"expected a Plan or a mapping, got {type(plan).__name__}")


def plan_hash(plan: Plan | Mapping[str, Any]) -> str:
    """SHA-256 (64 lowercase hex digits) of the plan's canonical JSON.

    A mapping is first validated and normalised with ``parse_plan`` (defaults filled in), so a
    plan hashes the same whether it is given as a model, as its wire dict or as a dict missing
    optional fields. Invalid input raises ``PlanValidationError``.
    """
    return _sha256_hex(canonical_json(_plan_wire(plan)))


def idempotency_key(plan: Plan | Mapping[str, Any], tenant_id: str, actor_id: str) -> str:
    """``sha256(canonical_json(plan) + tenant_id + actor_id)``, exactly as spec §3.1 defines it.

    The plain concatenation is unambiguous where it matters: keys are unique per tenant (index
    ``ux_exec_tenant_idem`` on ``(tenant_id, idempotency_key)``), so within one tenant the
    ``tenant_id`` part is a constant; the canonical JSON is a complete JSON object, so it ends
    exactly where its closing brace does; what follows the constant is therefore exactly the
    actor. Two different (plan, actor) pairs of one tenant never give the same hashed text.
    A mapping is normalised as in :func:`plan_hash`.
    """
    return _sha256_hex(canonical_json(_plan_wire(plan)) + tenant_id + actor_id)


class PlanDigests(NamedTuple):
    """What a submit derives from a plan's canonical JSON (`plan_digests`)."""

    plan_hash: str
    idempotency_key: str
    #: Characters of the plan's canonical JSON (logged as ``plan_bytes``).
    canonical_length: int


def plan_digests(plan: Plan | Mapping[str, Any], tenant_id: str, actor_id: str) -> PlanDigests:
    """`plan_hash` and `idempotency_key` of ``plan`` (and its canonical JSON's length), with
    the canonical JSON built once instead of once per figure: the same values."""
    text = canonical_json(_plan_wire(plan))
    return PlanDigests(_sha256_hex(text), _sha256_hex(text + tenant_id + actor_id), len(text))


def step_idempotency_key(execution_id: UUID | str, step_id: str) -> str:
    """The key an action handler receives to make a step's side effect happen at most once.

    ``f"{execution_id}:{step_id}"``: stable across retries and worker takeovers of one execution.
    """
    return f"{execution_id}:{step_id}"


def snapshot_hash(snapshot: Mapping[str, Any]) -> str:
    """SHA-256 (64 lowercase hex digits) of the canonical JSON of a plan snapshot.

    The snapshot is the frozen plan plus what was resolved at submit (policy id, approval level,
    estimates); an approval is bound to this hash as well as to the plan hash.
    """
    return _sha256_hex(canonical_json(snapshot))
