"""The execution state machine: statuses, the one legal-transition table, and its guard.

Every status write in the system goes through :func:`check_transition` (or uses
:func:`allowed_sources` to build the compare-and-set ``WHERE status = ANY(...)`` of its UPDATE),
so ``TRANSITIONS`` below is the only place that says which moves are legal:

    =================  ==========================================================================
    from               to
    =================  ==========================================================================
    pending            awaiting_approval, queued, running, failed, cancelled
    awaiting_approval  queued, running, rejected, cancelled, failed
    queued             running, cancelled, failed
    running            succeeded, failed, cancelled, queued (requeue after a worker crash,
                       SIGTERM or a retry), awaiting_approval (level-3 pause before a step)
    =================  ==========================================================================

``succeeded``, ``failed``, ``cancelled`` and ``rejected`` are terminal: nothing leaves them. A
timeout is ``failed`` with ``timed_out = true``, not a status of its own.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from types import MappingProxyType

from opsconductor.common.errors import FSMError

__all__ = [
    "STEP_TERMINAL",
    "TERMINAL",
    "TRANSITIONS",
    "ExecutionStatus",
    "StepStatus",
    "allowed_sources",
    "allowed_targets",
    "can_transition",
    "check_transition",
    "is_terminal",
]


class ExecutionStatus(StrEnum):
    """Status of an execution; the values are those of the ``execution_status`` Postgres enum."""

    PENDING = "pending"
    AWAITING_APPROVAL = "awaiting_approval"
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    REJECTED = "rejected"


class StepStatus(StrEnum):
    """Status of one step; the values are those of the ``valid_step_status`` CHECK constraint."""

    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    SKIPPED = "skipped"
    AWAITING_APPROVAL = "awaiting_approval"


_S = ExecutionStatus

#: Statuses nothing can leave.
TERMINAL: frozenset[ExecutionStatus] = frozenset(
    {_S.SUCCEEDED, _S.FAILED, _S.CANCELLED, _S.REJECTED}
)

#: Step statuses that end a step.
STEP_TERMINAL: frozenset[StepStatus] = frozenset(
    {StepStatus.SUCCEEDED, StepStatus.FAILED, StepStatus.SKIPPED}
)

#: The legal transitions, status -> statuses it may move to. The only copy in the system.
TRANSITIONS: Mapping[ExecutionStatus, frozenset[ExecutionStatus]] = MappingProxyType(
    {
        # Submitted: needs approval, goes to the queue (background) or straight to a worker
        # (immediate); it can still fail (e.g. the queue push fails) or be cancelled.
        _S.PENDING: frozenset(
            {_S.AWAITING_APPROVAL, _S.QUEUED, _S.RUNNING, _S.FAILED, _S.CANCELLED}
        ),
        # Approved -> queued (background) or running (immediate); a refusal is `rejected`, an
        # expired request or an invalidated binding `failed`.
        _S.AWAITING_APPROVAL: frozenset(
            {_S.QUEUED, _S.RUNNING, _S.REJECTED, _S.CANCELLED, _S.FAILED}
        ),
        _S.QUEUED: frozenset({_S.RUNNING, _S.CANCELLED, _S.FAILED}),
        # Back to `queued` when a job is requeued (worker crash, SIGTERM, retry after a failure);
        # to `awaiting_approval` when a level-3 plan pauses before a step that needs approval.
        _S.RUNNING: frozenset(
            {_S.SUCCEEDED, _S.FAILED, _S.CANCELLED, _S.QUEUED, _S.AWAITING_APPROVAL}
        ),
        _S.SUCCEEDED: frozenset(),
        _S.FAILED: frozenset(),
        _S.CANCELLED: frozenset(),
        _S.REJECTED: frozenset(),
    }
)

_SOURCES: Mapping[ExecutionStatus, frozenset[ExecutionStatus]] = MappingProxyType(
    {
        target: frozenset(source for source, targets in TRANSITIONS.items() if target in targets)
        for target in ExecutionStatus
    }
)


def _coerce(status: ExecutionStatus | str) -> ExecutionStatus:
    try:
        return ExecutionStatus(status)
    except ValueError:
        raise FSMError(
            f"Illegal state transition: unknown execution status {str(status)[:40]!r}",
            status=str(status)[:40],
        ) from None


def is_terminal(status: ExecutionStatus | str) -> bool:
    """Whether ``status`` is terminal (no transition leaves it)."""
    return _coerce(status) in TERMINAL


def allowed_targets(status: ExecutionStatus | str) -> frozenset[ExecutionStatus]:
    """The statuses an execution in ``status`` may move to (empty for terminal statuses)."""
    return TRANSITIONS[_coerce(status)]


def allowed_sources(target: ExecutionStatus | str) -> frozenset[ExecutionStatus]:
    """The statuses from which ``target`` may be reached.

    Storage code uses it for the compare-and-set: ``UPDATE ... SET status = $target WHERE id = $1
    AND status = ANY($sources)``, so the legality check and the write are one statement.
    """
    return _SOURCES[_coerce(target)]


def can_transition(current: ExecutionStatus | str, target: ExecutionStatus | str) -> bool:
    """Whether ``current -> target`` is legal (unknown statuses raise :class:`FSMError`)."""
    return _coerce(target) in TRANSITIONS[_coerce(current)]


def check_transition(current: ExecutionStatus | str, target: ExecutionStatus | str) -> None:
    """Raise :class:`FSMError` unless ``current -> target`` is a legal transition.

    Accepts enum members or their string values. The message is
    ``"Illegal state transition {current} -> {target}"``; an unknown status is illegal too.
    """
    source, destination = _coerce(current), _coerce(target)
    if destination not in TRANSITIONS[source]:
        raise FSMError(
            f"Illegal state transition {source} -> {destination}",
            from_status=source.value,
            to_status=destination.value,
        )
