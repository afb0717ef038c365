"""Turn a failed gRPC call into the most specific domain exception (httpx-style single mapper).

The server sends a status code plus a google.rpc ``ErrorInfo`` reason (and ``BadRequest`` field
violations for invalid plans). The reason picks the class when it is known; otherwise the code
does. Every class comes from ``opsconductor.common.errors``, so::

    ResourceBusyError          <- ABORTED / RESOURCE_BUSY
    PermissionDeniedError      <- PERMISSION_DENIED (also a builtin PermissionError)
    ApprovalInvalidatedError   <- FAILED_PRECONDITION / APPROVAL_INVALIDATED
    FSMError                   <- FAILED_PRECONDITION / ILLEGAL_TRANSITION
    ExecutionTimeoutError      <- DEADLINE_EXCEEDED (also an asyncio.TimeoutError)
    PlanValidationError        <- INVALID_ARGUMENT with field violations (``.violations``)
    QueueUnavailableError      <- UNAVAILABLE / QUEUE_UNAVAILABLE
"""

from __future__ import annotations

from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2

from opsconductor.common import errors as e

_STATUS_DETAILS_KEY = "grpc-status-details-bin"

_BY_REASON: dict[str, type[e.OpsConductorError]] = {
    cls.reason: cls
    for cls in (
        e.PlanValidationError,
        e.InvalidArgumentError,
        e.AuthenticationError,
        e.PermissionDeniedError,
        e.NotFoundError,
        e.ResourceBusyError,
        e.ConflictError,
        e.StaleLeaseError,
        e.FSMError,
        e.ApprovalInvalidatedError,
        e.ApprovalExpiredError,
        e.ApprovalDecidedError,
        e.SelfApprovalError,
        e.ApprovalLevelNotEnabledError,
        e.FeatureDisabledError,
        e.SecretResolutionError,
        e.QueueUnavailableError,
        e.ExecutionTimeoutError,
        e.StorageError,
    )
}

_BY_CODE: dict[grpc.StatusCode, type[e.OpsConductorError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: e.InvalidArgumentError,
    grpc.StatusCode.UNAUTHENTICATED: e.AuthenticationError,
    grpc.StatusCode.PERMISSION_DENIED: e.PermissionDeniedError,
    grpc.StatusCode.NOT_FOUND: e.NotFoundError,
    grpc.StatusCode.ABORTED: e.ConflictError,
    grpc.StatusCode.FAILED_PRECONDITION: e.FailedPreconditionError,
    grpc.StatusCode.DEADLINE_EXCEEDED: e.ExecutionTimeoutError,
}


class RpcError(e.OpsConductorError):
    """The call failed for a reason the client does not map to a domain error.

    Details: ``code`` (the gRPC status name). Transport failures (server unreachable) land here.
    """

    reason = "RPC_ERROR"


def _status_details(error: grpc.aio.AioRpcError) -> status_pb2.Status | None:
    metadata: Any = error.trailing_metadata() or ()
    for key, value in metadata:
        if key == _STATUS_DETAILS_KEY and isinstance(value, bytes):
            status = status_pb2.Status()
            status.ParseFromString(value)
            return status
    return None


def map_rpc_error(error: grpc.aio.AioRpcError) -> Exception:
    """The domain exception for ``error``; raise it ``from error``."""
    code = error.code()
    message = error.details() or code.name
    reason = ""
    metadata: dict[str, str] = {}
    violations: list[e.FieldViolation] = []
    status = _status_details(error)
    if status is not None:
        for any_detail in status.details:
            if any_detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                any_detail.Unpack(info)
                reason = info.reason
                metadata = dict(info.metadata)
            elif any_detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                any_detail.Unpack(bad)
                violations = [
                    e.FieldViolation(v.field, v.description) for v in bad.field_violations
                ]
    cls = _BY_REASON.get(reason) or _BY_CODE.get(code)
    if violations and cls is e.InvalidArgumentError:
        # Any invalid request may name its fields (e.g. ListExecutions' page_token), not only
        # an invalid plan: keep them, on the InvalidArgumentError that carries violations.
        cls = e.PlanValidationError
    if cls is None:
        return RpcError(message, code=code.name, **metadata)
    if issubclass(cls, e.PlanValidationError):
        return cls(message, violations=violations, **metadata)
    return cls(message, **metadata)
