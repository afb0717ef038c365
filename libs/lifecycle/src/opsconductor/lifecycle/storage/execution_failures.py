"""End an execution as failed: the one recipe of every path that does (the reaper's deadline,
lost-job, unstarted and undispatched passes, the approvals service's unreachable worker, the
worker's re-authorization refusal).

In one transaction: lock the execution (fenced on ``lease_token`` when given); leave it alone
(False) unless it is still in one of ``expected_from`` (any non-terminal status by default);
settle its steps; move it to ``failed`` with the error (one ``execution_completed`` event);
then what the ending frees: its fencing token, its locks, its idempotency key.

What differs between the paths are the facts, passed as arguments: whether a worker may have
left steps running (``fail_running_steps``: they end failed, their worker is gone), whether the
skipped steps are announced one event each (``skip_reason``) or skipped silently, whether
anything ran (``retire_key``: nothing did, so the plan may be submitted again at once).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any
from uuid import UUID

from opsconductor.common.fsm import TERMINAL, ExecutionStatus
from opsconductor.lifecycle.storage.execution_records import (
    PoolOrConnection,
    lock_execution,
    transaction,
)
from opsconductor.lifecycle.storage.execution_steps import skip_remaining_steps
from opsconductor.lifecycle.storage.executions import retire_idempotency_key, transition
from opsconductor.lifecycle.storage.locks import release_execution_locks
from opsconductor.lifecycle.storage.queries import query

__all__ = ["end_failed"]

_FAIL_RUNNING_STEPS = query("fail_running_steps_timed_out")
_SKIP_PENDING_STEPS = query("skip_pending_steps")


async def end_failed(
    db: PoolOrConnection,
    execution_id: UUID,
    *,
    by: str,
    error_class: str,
    error_message: str,
    expected_from: ExecutionStatus | Collection[ExecutionStatus] | None = None,
    lease_token: UUID | None = None,
    fail_running_steps: bool = False,
    skip_steps: bool = True,
    skip_reason: str | None = None,
    clear_lease: bool = False,
    timed_out: bool = False,
    release_locks: bool = False,
    retire_key: bool = False,
    event_payload: Mapping[str, Any] | None = None,
) -> bool:
    """End ``execution_id`` ``failed`` (see the module docstring); False, changing nothing, when
    it is no longer in ``expected_from`` (or already terminal).

    ``lease_token``: only while that token owns the execution (``StaleLeaseError`` otherwise);
    ``skip_steps``: its pending steps end skipped, with a ``step_skipped`` event each when
    ``skip_reason`` is given; ``clear_lease``: a worker that comes back can write nothing more;
    ``release_locks``: the locks it holds are released (by whoever ends it: a worker that is gone
    never will).
    """
    allowed = (
        frozenset({expected_from})
        if isinstance(expected_from, ExecutionStatus)
        else frozenset(expected_from or ())
    )
    async with transaction(db) as conn:
        locked = await lock_execution(conn, execution_id, lease_token=lease_token)
        status = ExecutionStatus(locked["status"])
        if status in TERMINAL or (allowed and status not in allowed):
            return False
        if fail_running_steps:
            await conn.execute(_FAIL_RUNNING_STEPS, execution_id)
        if skip_steps and skip_reason is not None:
            await skip_remaining_steps(
                conn, execution_id, 0, lease_token=lease_token, reason=skip_reason
            )
        elif skip_steps:
            await conn.execute(_SKIP_PENDING_STEPS, execution_id)
        fields: dict[str, Any] = {"error_class": error_class, "error_message": error_message}
        if clear_lease:
            fields["lease_token"] = None
        if timed_out:
            fields["timed_out"] = True
        await transition(
            conn,
            execution_id,
            to=ExecutionStatus.FAILED,
            by=by,
            # Fenced above, under the row lock: the same token still owns it.
            expected_from=status,
            fields=fields,
            event_payload=event_payload,
            tenant_id=locked["tenant_id"],
        )
        if release_locks:
            await release_execution_locks(conn, execution_id)
        if retire_key:
            await retire_idempotency_key(conn, execution_id)
    return True
