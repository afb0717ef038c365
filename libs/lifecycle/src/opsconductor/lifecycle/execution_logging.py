"""The spec §7.2 fields of an execution, bound once to every log record made while serving it.

A service that starts working on an execution calls :func:`bind_execution` (a context manager)
or :func:`bind_execution_fields` (for the rest of the current task, e.g. an RPC): every record
logged meanwhile — lifecycle, steps, transitions, decisions, denials — carries ``request_id``
(the submit's: a background job logs the request that created it), ``plan_hash``, ``exec_id``,
``actor_id``, ``tenant_id``, ``action``, ``targets``, ``approval_level``, ``timing``,
``status``, ``error_class``, ``duration_ms``, ``retries_total``, ``queue_wait_ms``,
``worker_id``, ``lease_renewals`` and ``cancel_checks_performed``. Values a call site passes
explicitly win (``execution_completed`` carries the final status and duration).

Backed by ``structlog.contextvars``: it follows asyncio tasks, so concurrent executions in one
process never see each other's fields.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Final

import structlog

if TYPE_CHECKING:  # the record type lives in the storage layer, which may import this module
    from opsconductor.lifecycle.storage.execution_records import ExecutionRecord

__all__ = [
    "SPEC_FIELDS",
    "bind_execution",
    "bind_execution_fields",
    "execution_log_fields",
]

#: The fields spec §7.2 requires on every execution log record.
SPEC_FIELDS: Final = (
    "request_id",
    "plan_hash",
    "exec_id",
    "actor_id",
    "tenant_id",
    "action",
    "targets",
    "approval_level",
    "timing",
    "status",
    "error_class",
    "duration_ms",
    "retries_total",
    "queue_wait_ms",
    "worker_id",
    "lease_renewals",
    "cancel_checks_performed",
)


def _plan_parts(plan_snapshot: Mapping[str, Any] | None) -> tuple[str, list[str]]:
    plan = plan_snapshot.get("plan") if isinstance(plan_snapshot, Mapping) else None
    steps = plan.get("steps") if isinstance(plan, Mapping) else None
    actions: list[str] = []
    targets: list[str] = []
    for step in steps or ():
        if not isinstance(step, Mapping):
            continue
        action = step.get("action")
        if action and action not in actions:
            actions.append(str(action))
        for target in step.get("targets") or ():
            ref = target.get("ref") if isinstance(target, Mapping) else target
            if ref is not None and str(ref) not in targets:
                targets.append(str(ref))
    return ",".join(sorted(actions)), sorted(targets)


def execution_log_fields(
    record: ExecutionRecord,
    *,
    worker_id: str | None = None,
    queue_wait_ms: int | None = None,
) -> dict[str, Any]:
    """The §7.2 fields of ``record`` as it is now (plus mode, SLA class and policy)."""
    action, targets = _plan_parts(record.plan_snapshot)
    return {
        "request_id": record.request_id,
        "plan_hash": record.plan_hash,
        "exec_id": str(record.id),
        "actor_id": record.actor_id,
        "tenant_id": record.tenant_id,
        "action": action,
        "targets": targets,
        "approval_level": record.approval_level,
        "timing": {
            "created_at": record.created_at.isoformat(),
            "started_at": record.started_at.isoformat() if record.started_at else None,
            "ended_at": record.ended_at.isoformat() if record.ended_at else None,
        },
        "status": str(record.status),
        "error_class": record.error_class,
        "duration_ms": record.duration_ms,
        "retries_total": max(record.attempts - 1, 0),
        "queue_wait_ms": queue_wait_ms,
        "worker_id": worker_id or record.worker_id,
        "lease_renewals": record.lease_renewals,
        "cancel_checks_performed": record.cancel_checks_performed,
        "execution_mode": record.execution_mode,
        "sla_class": record.sla_class,
        "timeout_policy_id": record.timeout_policy_id,
    }


def _fields_to_bind(record: ExecutionRecord, extra: Mapping[str, Any]) -> dict[str, Any]:
    fields = execution_log_fields(record)
    current = structlog.contextvars.get_contextvars()
    # Known already in this context (the queue wait measured by the consumer, the RPC's id
    # for an execution created before request ids were kept): keep, do not blank it.
    for key in ("queue_wait_ms", "request_id", "worker_id"):
        if fields.get(key) is None and current.get(key) is not None:
            fields.pop(key)
    fields.update({k: v for k, v in extra.items() if v is not None})
    return fields


@contextmanager
def bind_execution(record: ExecutionRecord, **extra: Any) -> Iterator[dict[str, Any]]:
    """Bind ``record``'s §7.2 fields (and ``extra``) for the duration of the block."""
    fields = _fields_to_bind(record, extra)
    with structlog.contextvars.bound_contextvars(**fields):
        yield fields


def bind_execution_fields(record: ExecutionRecord, **extra: Any) -> None:
    """Bind ``record``'s §7.2 fields for the rest of the current task (e.g. the RPC)."""
    structlog.contextvars.bind_contextvars(**_fields_to_bind(record, extra))
