"""Domain exceptions of OpsConductor Execution: the contract the servers and the client share.

Every error raised on purpose by OpsConductor code derives from one root, so callers can catch
``OpsConductorError`` and nothing else. Each class carries ``reason``, a stable machine-readable
code sent to callers (the google.rpc ``ErrorInfo`` reason), and its docstring's first paragraph
is its default message. Messages and details are shown to callers: they must never contain a
secret value (name the secret reference or the field instead).

The hierarchy (reason on the right):

* OpsConductorError ..................................... INTERNAL
  + InvalidArgumentError (ValueError) ................... INVALID_ARGUMENT
    - PlanValidationError ............................... INVALID_PLAN
    - ApprovalPolicyError ............................... INVALID_APPROVAL_POLICY
  + AuthenticationError ................................. UNAUTHENTICATED
  + PermissionDeniedError (PermissionError) ............. PERMISSION_DENIED
    - SecretUseDeniedError .............................. SECRET_USE_DENIED
    - TenantPolicyDeniedError ........................... TENANT_POLICY_DENIED
  + NotFoundError ....................................... NOT_FOUND
  + ResourceBusyError ................................... RESOURCE_BUSY
  + ConflictError ....................................... CONFLICT
    - DlqEntryRequeuedError ............................. DLQ_ENTRY_ALREADY_REQUEUED
  + StaleLeaseError ..................................... LEASE_LOST
  + FailedPreconditionError ............................. FAILED_PRECONDITION
    - FSMError .......................................... ILLEGAL_TRANSITION
    - ApprovalInvalidatedError .......................... APPROVAL_INVALIDATED
    - ApprovalExpiredError .............................. APPROVAL_EXPIRED
    - ApprovalDecidedError .............................. APPROVAL_ALREADY_DECIDED
    - SelfApprovalError ................................. SELF_APPROVAL_FORBIDDEN
    - ApprovalLevelNotEnabledError ...................... APPROVAL_LEVEL_NOT_ENABLED
    - FeatureDisabledError .............................. STAGE_E_DISABLED
    - SecretResolutionError ............................. SECRET_UNRESOLVED
    - LeaseRenewalLimitError ............................ LEASE_RENEWAL_LIMIT
    - DeadLetterNotRequeueableError ..................... DLQ_ENTRY_NOT_REQUEUEABLE
  + ResourceExhaustedError .............................. RESOURCE_EXHAUSTED
    - QuotaExceededError ................................ QUOTA_EXCEEDED
    - SubscriberLaggedError ............................. SUBSCRIBER_LAGGED
  + QueueUnavailableError ............................... QUEUE_UNAVAILABLE
  + WorkerUnavailableError .............................. WORKER_UNAVAILABLE
  + UnimplementedError .................................. UNIMPLEMENTED
  + ExecutionTimeoutError (asyncio.TimeoutError) ........ EXECUTION_TIMEOUT
  + StorageError ........................................ STORAGE_ERROR
    - MigrationError .................................... MIGRATION_FAILED
      - MigrationDefinitionError ........................ MIGRATION_INVALID
      - MigrationChecksumError .......................... MIGRATION_CHECKSUM_MISMATCH
      - MigrationStateError ............................. MIGRATION_STATE_MISMATCH

The rest of the tree is defined beside the code that raises it (class < base: reason, module):

    InvalidPageRequestError < PlanValidationError: INVALID_ARGUMENT (lifecycle.storage.paging)
    UnknownActionError < PlanValidationError: INVALID_PLAN (actions.registry)
    SecretCatalogueError < InvalidArgumentError: INVALID_ARGUMENT (common.secret_catalogue)
    TenantPolicyError < InvalidArgumentError: INVALID_ARGUMENT (common.tenant_policy)
    ActionError < OpsConductorError: ACTION_ERROR (actions.base)
    ActionFailedError < ActionError: ACTION_FAILED (actions.base)
    ActionTimeoutError < ActionFailedError: ACTION_TIMEOUT (actions.base)
    EgressDeniedError < ActionFailedError: EGRESS_DENIED (actions.http)
    SandboxUnavailableError < ActionFailedError: SANDBOX_UNAVAILABLE (actions.sandbox)
    ActionPluginError < OpsConductorError: ACTION_PLUGIN_INVALID (actions.registry)
    RbacPolicyError < OpsConductorError: INVALID_RBAC_POLICY (policy.rbac)
    StackStartError < OpsConductorError: DEVSTACK_START_FAILED (devstack.supervisor)
    EmbeddedServerError < OpsConductorError: EMBEDDED_SERVER_FAILED (devstack.embedded)
    RpcError < OpsConductorError: RPC_ERROR (client.errors; a status the client maps to no class)

Every reason a caller can receive names a class of this module, so the client raises the very
class the server raised (``tests/unit/test_error_tree.py`` checks it for every class of every
server package). Defined elsewhere are only classes a caller never sees by their own reason:
those that report as their base (their base's reason and status), the failures of a step's
action (they carry the step's output, an action type, and are recorded on the step, never end an
RPC) and start-up and configuration failures, reported as ``INTERNAL`` if one ever escaped an
RPC. Outside the tree on purpose: ``SecretUnavailable`` (common.secrets, a provider's "no such
secret" signal the resolver turns into :class:`SecretResolutionError`) and the command line's
own ``ConfigError``, ``DevKeyError`` and ``PlanFileError`` (client.cli, one-line messages and
exit codes, never sent).

Three classes also derive from a builtin so that code written against the spec's snippets
(``pytest.raises(PermissionError)``, ``pytest.raises(asyncio.TimeoutError)``) and generic
``except ValueError`` handlers keep working. Each class's gRPC status is in one table,
:mod:`opsconductor.contract.status_codes`, from which the servers build their statuses and the
client maps them back; this module knows nothing about gRPC. ``opsconductor.common.errors``
re-exports it for the server code.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

__all__ = [
    "ApprovalDecidedError",
    "ApprovalExpiredError",
    "ApprovalInvalidatedError",
    "ApprovalLevelNotEnabledError",
    "ApprovalPolicyError",
    "AuthenticationError",
    "ConflictError",
    "DeadLetterNotRequeueableError",
    "DlqEntryRequeuedError",
    "ExecutionTimeoutError",
    "FSMError",
    "FailedPreconditionError",
    "FeatureDisabledError",
    "FieldViolation",
    "InvalidArgumentError",
    "LeaseRenewalLimitError",
    "MigrationChecksumError",
    "MigrationDefinitionError",
    "MigrationError",
    "MigrationStateError",
    "NotFoundError",
    "OpsConductorError",
    "PermissionDeniedError",
    "PlanValidationError",
    "QueueUnavailableError",
    "QuotaExceededError",
    "ResourceBusyError",
    "ResourceExhaustedError",
    "SecretResolutionError",
    "SecretUseDeniedError",
    "SelfApprovalError",
    "StaleLeaseError",
    "StorageError",
    "SubscriberLaggedError",
    "TenantPolicyDeniedError",
    "UnimplementedError",
    "WorkerUnavailableError",
]


def _default_message(cls: type) -> str:
    """First paragraph of the class docstring, on one line."""
    doc = inspect.cleandoc(cls.__doc__ or "")
    return " ".join(doc.split("\n\n", 1)[0].split())


class OpsConductorError(Exception):
    """An internal error occurred."""

    reason: ClassVar[str] = "INTERNAL"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # The docstring is the default message: a class without one would say nothing useful.
        if not cls.__dict__.get("__doc__"):
            raise TypeError(f"{cls.__name__} needs a docstring: it is its default message")

    def __init__(self, message: str | None = None, **details: object) -> None:
        self.message: str = message if message is not None else _default_message(type(self))
        #: Structured, caller-visible context (ids, keys, limits). Never secret values.
        self.details: dict[str, object] = dict(details)
        # Only the message goes into args: pickling rebuilds with cls(message) and then restores
        # __dict__ (details and subclass state), which keeps every subclass picklable.
        super().__init__(self.message)

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r})"


class InvalidArgumentError(OpsConductorError, ValueError):
    """The request is invalid."""

    reason = "INVALID_ARGUMENT"


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One problem of a rejected plan: where (a path like ``steps[0].targets[2].ref``) and what.

    ``field`` is empty when the problem concerns the plan as a whole. ``description`` tells the
    caller how to fix it and never quotes a parameter value.
    """

    field: str
    description: str

    def __str__(self) -> str:
        return f"{self.field}: {self.description}" if self.field else self.description


class PlanValidationError(InvalidArgumentError):
    """The plan is invalid."""

    reason = "INVALID_PLAN"

    def __init__(
        self,
        message: str | None = None,
        *,
        violations: Iterable[FieldViolation] = (),
        **details: object,
    ) -> None:
        self.violations: list[FieldViolation] = list(violations)
        if message is None and self.violations:
            message = f"{_default_message(type(self)).rstrip('.')}: {self.violations[0]}"
            if len(self.violations) > 1:
                message += f" (and {len(self.violations) - 1} more)"
        super().__init__(message, **details)

    @classmethod
    def for_field(cls, field: str, description: str) -> PlanValidationError:
        """A plan error with a single field violation (e.g. an unknown action found by the api)."""
        return cls(violations=[FieldViolation(field, description)])


class ApprovalPolicyError(InvalidArgumentError):
    """The approval policy file is invalid."""

    reason = "INVALID_APPROVAL_POLICY"


class AuthenticationError(OpsConductorError):
    """Authentication is missing, expired or invalid."""

    reason = "UNAUTHENTICATED"


class PermissionDeniedError(OpsConductorError, PermissionError):
    """The caller is not allowed to perform this operation."""

    reason = "PERMISSION_DENIED"


class SecretUseDeniedError(PermissionDeniedError):
    """A step would use a secret where the tenant's secret catalogue does not allow it."""

    reason = "SECRET_USE_DENIED"


class TenantPolicyDeniedError(PermissionDeniedError):
    """The tenant's policy does not allow this plan."""

    reason = "TENANT_POLICY_DENIED"


class NotFoundError(OpsConductorError):
    """The requested resource does not exist."""

    reason = "NOT_FOUND"


class ResourceBusyError(OpsConductorError):
    """A target of this plan is locked by another execution; retry once it has finished.

    Details: ``lock_key`` and ``held_by_execution_id``.
    """

    reason = "RESOURCE_BUSY"


class ConflictError(OpsConductorError):
    """The resource was changed concurrently; reload it and retry."""

    reason = "CONFLICT"


class DlqEntryRequeuedError(ConflictError):
    """This dead-letter entry was already requeued."""

    reason = "DLQ_ENTRY_ALREADY_REQUEUED"


class StaleLeaseError(OpsConductorError):
    """The job lease was lost to another worker; this worker may no longer write for it.

    Raised when a fenced write (conditional on the lease token) matches no row.
    """

    reason = "LEASE_LOST"


class FailedPreconditionError(OpsConductorError):
    """The system is not in a state that allows this operation."""

    reason = "FAILED_PRECONDITION"


class FSMError(FailedPreconditionError):
    """Illegal state transition.

    Raised by ``opsconductor.common.fsm.check_transition`` with the message
    ``"Illegal state transition {from} -> {to}"`` and details ``from_status``/``to_status``.
    """

    reason = "ILLEGAL_TRANSITION"


class ApprovalInvalidatedError(FailedPreconditionError):
    """The plan changed after it was approved; a new approval is required."""

    reason = "APPROVAL_INVALIDATED"


class ApprovalExpiredError(FailedPreconditionError):
    """The approval request expired before it was decided; submit the plan again."""

    reason = "APPROVAL_EXPIRED"


class ApprovalDecidedError(FailedPreconditionError):
    """The approval request has already been decided."""

    reason = "APPROVAL_ALREADY_DECIDED"


class SelfApprovalError(FailedPreconditionError):
    """The requester of an execution cannot approve it; another principal must decide."""

    reason = "SELF_APPROVAL_FORBIDDEN"


class ApprovalLevelNotEnabledError(FailedPreconditionError):
    """The approval level this plan requires is not enabled yet for this tenant."""

    reason = "APPROVAL_LEVEL_NOT_ENABLED"


class FeatureDisabledError(FailedPreconditionError):
    """Stage E execution is disabled for this tenant."""

    reason = "STAGE_E_DISABLED"


class SecretResolutionError(FailedPreconditionError):
    """A secret reference of the plan could not be resolved.

    Details name the reference (``provider:name``), never a value.
    """

    reason = "SECRET_UNRESOLVED"


class LeaseRenewalLimitError(FailedPreconditionError):
    """The job lease was renewed as often as its timeout policy allows; it will not be extended.

    Details: ``job_id``, ``lease_renewals``. The holder keeps the lease until its deadline.
    """

    reason = "LEASE_RENEWAL_LIMIT"


class DeadLetterNotRequeueableError(FailedPreconditionError):
    """This dead-lettered execution cannot be requeued."""

    reason = "DLQ_ENTRY_NOT_REQUEUEABLE"


class ResourceExhaustedError(OpsConductorError):
    """A limit was reached (e.g. live subscribers per tenant or per process); retry later.

    Details name the limit (``limit``, ``max``) so the caller can tell which one.
    ``retry_after_s`` (also in the details), when known, is how long the caller should wait
    before it retries; the servers send it as a ``google.rpc.RetryInfo``.
    """

    reason = "RESOURCE_EXHAUSTED"

    def __init__(
        self, message: str | None = None, *, retry_after_s: float | None = None, **details: object
    ) -> None:
        self.retry_after_s: float | None = retry_after_s
        super().__init__(message, **details)
        if retry_after_s is not None:
            self.details["retry_after_s"] = f"{retry_after_s:g}"


class QuotaExceededError(ResourceExhaustedError):
    """A quota of this tenant is used up; retry once some of its work has finished.

    Details: ``quota`` (``queued`` or ``immediate``), ``limit``, ``in_use`` and
    ``retry_after_s``. Nothing was created by the refused request.
    """

    reason = "QUOTA_EXCEEDED"


class SubscriberLaggedError(ResourceExhaustedError):
    """The subscriber read events too slowly and was disconnected; resume from ``after_seq``.

    Details: ``execution_id`` and ``after_seq``, the seq of the last event delivered, from which
    a new subscription misses nothing.
    """

    reason = "SUBSCRIBER_LAGGED"


class QueueUnavailableError(OpsConductorError):
    """The background queue is unavailable; retry later (immediate plans are unaffected)."""

    reason = "QUEUE_UNAVAILABLE"


class WorkerUnavailableError(OpsConductorError):
    """No worker could be reached to run the execution; it was not started. Retry later."""

    reason = "WORKER_UNAVAILABLE"


class UnimplementedError(OpsConductorError):
    """This operation is part of the contract but not served yet."""

    reason = "UNIMPLEMENTED"


class ExecutionTimeoutError(OpsConductorError, asyncio.TimeoutError):
    """The execution exceeded its time budget.

    Details: ``timeout_policy_id`` and ``timeout_ms``. Also an ``asyncio.TimeoutError``.
    """

    reason = "EXECUTION_TIMEOUT"


class StorageError(OpsConductorError):
    """The database failed to complete the operation."""

    reason = "STORAGE_ERROR"


class MigrationError(StorageError):
    """The schema migration failed."""

    reason = "MIGRATION_FAILED"


class MigrationDefinitionError(MigrationError):
    """The migration files are invalid."""

    reason = "MIGRATION_INVALID"


class MigrationChecksumError(MigrationError):
    """An applied migration was edited after it was applied; add a new migration instead."""

    reason = "MIGRATION_CHECKSUM_MISMATCH"


class MigrationStateError(MigrationError):
    """The database's migration history does not match the migration files."""

    reason = "MIGRATION_STATE_MISMATCH"
