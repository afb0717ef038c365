"""Turn a failed gRPC call into the most specific domain exception (httpx-style single mapper).

The server sends a status code plus a google.rpc ``ErrorInfo`` reason (and ``BadRequest`` field
violations for invalid plans). The reason picks the class when it is known; otherwise the code
does, through the fallback rows of the table the servers use too
(:mod:`opsconductor.contract.status_codes`). Every class comes from
``opsconductor.contract.errors``, so::

    ResourceBusyError          <- ABORTED / RESOURCE_BUSY
    PermissionDeniedError      <- PERMISSION_DENIED (also a builtin PermissionError)
    ApprovalInvalidatedError   <- FAILED_PRECONDITION / APPROVAL_INVALIDATED
    FSMError                   <- FAILED_PRECONDITION / ILLEGAL_TRANSITION
    ExecutionTimeoutError      <- DEADLINE_EXCEEDED (also an asyncio.TimeoutError)
    PlanValidationError        <- INVALID_ARGUMENT with field violations (``.violations``)
    QueueUnavailableError      <- UNAVAILABLE / QUEUE_UNAVAILABLE
    QuotaExceededError         <- RESOURCE_EXHAUSTED / QUOTA_EXCEEDED (``.retry_after_s`` from
                                  the ``RetryInfo``); any other RESOURCE_EXHAUSTED (a message
                                  too large, the server's concurrency limit) is a
                                  ResourceExhaustedError
"""

from __future__ import annotations

from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2

from opsconductor.contract import errors as e
from opsconductor.contract.status_codes import class_for_code, class_for_reason

_STATUS_DETAILS_KEY = "grpc-status-details-bin"


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
    retry_after_s: float | None = None
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
            elif any_detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                retry = error_details_pb2.RetryInfo()
                any_detail.Unpack(retry)
                retry_after_s = retry.retry_delay.ToMilliseconds() / 1000
    cls = class_for_reason(reason) or class_for_code(code)
    if violations and cls is e.InvalidArgumentError:
        # Any invalid request may name its fields (e.g. ListExecutions' page_token), not only
        # an invalid plan: keep them, on the InvalidArgumentError that carries violations.
        cls = e.PlanValidationError
    if cls is None:
        return RpcError(message, code=code.name, **metadata)
    if issubclass(cls, e.PlanValidationError):
        return cls(message, violations=violations, **metadata)
    if issubclass(cls, e.ResourceExhaustedError):
        hinted = metadata.pop("retry_after_s", None)
        if retry_after_s is None and hinted is not None:
            retry_after_s = _seconds(hinted)
        return cls(message, retry_after_s=retry_after_s, **metadata)
    return cls(message, **metadata)


def _seconds(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None
