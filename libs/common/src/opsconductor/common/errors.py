"""The domain exceptions, defined in the contract package the client shares
(:mod:`opsconductor.contract.errors`); re-exported here for the server code.
"""

from __future__ import annotations

from opsconductor.contract.errors import (
    ApprovalDecidedError,
    ApprovalExpiredError,
    ApprovalInvalidatedError,
    ApprovalLevelNotEnabledError,
    AuthenticationError,
    ConflictError,
    ExecutionTimeoutError,
    FailedPreconditionError,
    FeatureDisabledError,
    FieldViolation,
    FSMError,
    InvalidArgumentError,
    NotFoundError,
    OpsConductorError,
    PermissionDeniedError,
    PlanValidationError,
    QueueUnavailableError,
    ResourceBusyError,
    SecretResolutionError,
    SelfApprovalError,
    StaleLeaseError,
    StorageError,
    UnimplementedError,
    WorkerUnavailableError,
)

__all__ = [
    "ApprovalDecidedError",
    "ApprovalExpiredError",
    "ApprovalInvalidatedError",
    "ApprovalLevelNotEnabledError",
    "AuthenticationError",
    "ConflictError",
    "ExecutionTimeoutError",
    "FSMError",
    "FailedPreconditionError",
    "FeatureDisabledError",
    "FieldViolation",
    "InvalidArgumentError",
    "NotFoundError",
    "OpsConductorError",
    "PermissionDeniedError",
    "PlanValidationError",
    "QueueUnavailableError",
    "ResourceBusyError",
    "SecretResolutionError",
    "SelfApprovalError",
    "StaleLeaseError",
    "StorageError",
    "UnimplementedError",
    "WorkerUnavailableError",
]
