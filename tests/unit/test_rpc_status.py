"""Domain errors map to the right gRPC status and ErrorInfo reason; internal errors leak nothing."""

from __future__ import annotations

import inspect

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from opsconductor.common import errors
from opsconductor.common.masking import REDACTED
from opsconductor.rpc.status import (
    ERROR_DOMAIN,
    code_for_exception,
    is_expected,
    status_for_exception,
)

RID = "req-123"
Code = grpc.StatusCode

CASES: list[tuple[errors.OpsConductorError, grpc.StatusCode, str]] = [
    (
        errors.PlanValidationError(
            violations=[errors.FieldViolation("steps[0].targets", "must not be empty")]
        ),
        Code.INVALID_ARGUMENT,
        "INVALID_PLAN",
    ),
    (
        errors.InvalidArgumentError("page_size must be at most 200"),
        Code.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
    ),
    (errors.AuthenticationError("token expired"), Code.UNAUTHENTICATED, "UNAUTHENTICATED"),
    (errors.PermissionDeniedError(), Code.PERMISSION_DENIED, "PERMISSION_DENIED"),
    (errors.NotFoundError(execution_id="e-1"), Code.NOT_FOUND, "NOT_FOUND"),
    (
        errors.ResourceBusyError(lock_key="lock:v1:t:host-1:restart", held_by_execution_id="e-9"),
        Code.ABORTED,
        "RESOURCE_BUSY",
    ),
    (errors.ConflictError(), Code.ABORTED, "CONFLICT"),
    (errors.StaleLeaseError(), Code.ABORTED, "LEASE_LOST"),
    (
        errors.FSMError("Illegal state transition succeeded -> running"),
        Code.FAILED_PRECONDITION,
        "ILLEGAL_TRANSITION",
    ),
    (errors.ApprovalInvalidatedError(), Code.FAILED_PRECONDITION, "APPROVAL_INVALIDATED"),
    (errors.ApprovalExpiredError(), Code.FAILED_PRECONDITION, "APPROVAL_EXPIRED"),
    (errors.ApprovalDecidedError(), Code.FAILED_PRECONDITION, "APPROVAL_ALREADY_DECIDED"),
    (errors.SelfApprovalError(), Code.FAILED_PRECONDITION, "SELF_APPROVAL_FORBIDDEN"),
    (
        errors.ApprovalLevelNotEnabledError(),
        Code.FAILED_PRECONDITION,
        "APPROVAL_LEVEL_NOT_ENABLED",
    ),
    (errors.FeatureDisabledError(), Code.FAILED_PRECONDITION, "STAGE_E_DISABLED"),
    (
        errors.SecretResolutionError(ref="env:DB_PASSWORD"),
        Code.FAILED_PRECONDITION,
        "SECRET_UNRESOLVED",
    ),
    (errors.FailedPreconditionError(), Code.FAILED_PRECONDITION, "FAILED_PRECONDITION"),
    (
        errors.QuotaExceededError(retry_after_s=5.0, quota="queued", limit=10, in_use=10),
        Code.RESOURCE_EXHAUSTED,
        "QUOTA_EXCEEDED",
    ),
    (errors.ResourceExhaustedError(), Code.RESOURCE_EXHAUSTED, "RESOURCE_EXHAUSTED"),
    (errors.QueueUnavailableError(), Code.UNAVAILABLE, "QUEUE_UNAVAILABLE"),
    (errors.ResourceExhaustedError(), Code.RESOURCE_EXHAUSTED, "RESOURCE_EXHAUSTED"),
    (errors.SubscriberLaggedError(), Code.RESOURCE_EXHAUSTED, "SUBSCRIBER_LAGGED"),
    (errors.WorkerUnavailableError(), Code.UNAVAILABLE, "WORKER_UNAVAILABLE"),
    (
        errors.UnimplementedError("SubmitExecution is not implemented yet"),
        Code.UNIMPLEMENTED,
        "UNIMPLEMENTED",
    ),
    (
        errors.ExecutionTimeoutError(timeout_policy_id="fast_read", timeout_ms=10000),
        Code.DEADLINE_EXCEEDED,
        "EXECUTION_TIMEOUT",
    ),
    (errors.StorageError(), Code.UNAVAILABLE, "STORAGE_ERROR"),
    # Moved into the one tree from the packages that raise them (same codes and reasons).
    (errors.ApprovalPolicyError(), Code.INVALID_ARGUMENT, "INVALID_APPROVAL_POLICY"),
    (errors.SecretUseDeniedError(), Code.PERMISSION_DENIED, "SECRET_USE_DENIED"),
    (errors.TenantPolicyDeniedError(), Code.PERMISSION_DENIED, "TENANT_POLICY_DENIED"),
    (errors.DlqEntryRequeuedError(), Code.ABORTED, "DLQ_ENTRY_ALREADY_REQUEUED"),
    (errors.LeaseRenewalLimitError(), Code.FAILED_PRECONDITION, "LEASE_RENEWAL_LIMIT"),
    (
        errors.DeadLetterNotRequeueableError(),
        Code.FAILED_PRECONDITION,
        "DLQ_ENTRY_NOT_REQUEUEABLE",
    ),
    (errors.MigrationError(), Code.UNAVAILABLE, "MIGRATION_FAILED"),
    (errors.MigrationDefinitionError(), Code.UNAVAILABLE, "MIGRATION_INVALID"),
    (errors.MigrationChecksumError(), Code.UNAVAILABLE, "MIGRATION_CHECKSUM_MISMATCH"),
    (errors.MigrationStateError(), Code.UNAVAILABLE, "MIGRATION_STATE_MISMATCH"),
]


def decode(status: grpc.Status) -> status_pb2.Status:
    """The google.rpc.Status a client gets from the grpc-status-details-bin trailer."""
    blobs = [v for k, v in status.trailing_metadata if k == "grpc-status-details-bin"]
    assert len(blobs) == 1
    assert isinstance(blobs[0], bytes)
    return status_pb2.Status.FromString(blobs[0])


def error_info(rich: status_pb2.Status) -> error_details_pb2.ErrorInfo:
    infos = [d for d in rich.details if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR)]
    assert len(infos) == 1, "exactly one ErrorInfo per status"
    info = error_details_pb2.ErrorInfo()
    infos[0].Unpack(info)
    return info


@pytest.mark.parametrize(
    ("exc", "code", "reason"), CASES, ids=[type(case[0]).__name__ for case in CASES]
)
def test_domain_error_maps_to_its_code_and_reason(
    exc: errors.OpsConductorError, code: grpc.StatusCode, reason: str
) -> None:
    """Each domain error gets its documented status code and ErrorInfo(reason, domain)."""
    status = status_for_exception(exc, request_id=RID)
    assert status.code is code
    assert code_for_exception(exc) is code
    assert is_expected(exc)
    rich = decode(status)
    assert rich.code == code.value[0]
    assert rich.message == status.details
    info = error_info(rich)
    assert info.reason == reason == exc.reason
    assert info.domain == ERROR_DOMAIN
    assert info.metadata["request_id"] == RID
    assert (("x-request-id", RID)) in status.trailing_metadata


def test_every_domain_error_class_has_a_specific_status() -> None:
    """No error class of the domain tree falls through to INTERNAL (only the root does)."""
    classes = [
        obj
        for obj in vars(errors).values()
        if inspect.isclass(obj) and issubclass(obj, errors.OpsConductorError)
    ]
    unmapped = [
        cls.__name__
        for cls in classes
        if cls is not errors.OpsConductorError and code_for_exception(cls()) is Code.INTERNAL
    ]
    assert unmapped == []
    assert {type(case[0]) for case in CASES} >= set(classes) - {errors.OpsConductorError}


def test_domain_error_message_and_details_reach_the_caller() -> None:
    """Domain messages are caller-facing; details become ErrorInfo metadata strings."""
    exc = errors.ResourceBusyError(lock_key="lock:v1:t1:web-1:restart", held_by_execution_id="e-9")
    status = status_for_exception(exc, request_id=RID)
    assert status.details == exc.message
    info = error_info(decode(status))
    assert dict(info.metadata) == {
        "lock_key": "lock:v1:t1:web-1:restart",
        "held_by_execution_id": "e-9",
        "request_id": RID,
    }


def test_plan_validation_error_carries_bad_request_field_violations() -> None:
    """An invalid plan lists every field violation in a google.rpc.BadRequest detail."""
    exc = errors.PlanValidationError(
        violations=[
            errors.FieldViolation("steps[0].targets", "must not be empty"),
            errors.FieldViolation("sla_class", "must be one of fast, medium, long"),
        ]
    )
    rich = decode(status_for_exception(exc, request_id=RID))
    bad = [d for d in rich.details if d.Is(error_details_pb2.BadRequest.DESCRIPTOR)]
    assert len(bad) == 1
    request = error_details_pb2.BadRequest()
    bad[0].Unpack(request)
    assert [(v.field, v.description) for v in request.field_violations] == [
        ("steps[0].targets", "must not be empty"),
        ("sla_class", "must be one of fast, medium, long"),
    ]


def retry_infos(rich: status_pb2.Status) -> list[error_details_pb2.RetryInfo]:
    found = []
    for detail in rich.details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            found.append(info)
    return found


def test_a_quota_refusal_carries_a_retry_info_and_a_readable_reason() -> None:
    """RESOURCE_EXHAUSTED with the delay in a google.rpc.RetryInfo and in the ErrorInfo."""
    exc = errors.QuotaExceededError(
        "tenant 'acme' has 10 background jobs waiting, its limit (quota max_queued)",
        retry_after_s=2.5,
        quota="queued",
        limit=10,
        in_use=10,
    )
    status = status_for_exception(exc, request_id=RID)
    assert status.code is Code.RESOURCE_EXHAUSTED
    assert status.details == exc.message
    rich = decode(status)
    [retry] = retry_infos(rich)
    assert retry.retry_delay.ToMilliseconds() == 2500
    assert dict(error_info(rich).metadata) == {
        "quota": "queued",
        "limit": "10",
        "in_use": "10",
        "retry_after_s": "2.5",
        "request_id": RID,
    }


def test_a_resource_exhausted_error_without_a_delay_sends_no_retry_info() -> None:
    exc = errors.ResourceExhaustedError()
    assert exc.retry_after_s is None
    assert "retry_after_s" not in exc.details
    assert retry_infos(decode(status_for_exception(exc, request_id=RID))) == []


def test_details_are_masked_bounded_and_stringified() -> None:
    """Secret-named details are redacted, None dropped, long values cut, numbers as strings."""
    exc = errors.NotFoundError(password="hunter2", missing=None, long="x" * 5000, attempts=3)
    metadata = error_info(decode(status_for_exception(exc, request_id=RID))).metadata
    assert metadata["password"] == REDACTED
    assert "missing" not in metadata
    assert len(metadata["long"]) == 512
    assert metadata["attempts"] == "3"


@pytest.mark.parametrize(
    "exc",
    [
        RuntimeError("password=hunter2 at /srv/app/secret_module.py line 7"),
        KeyError("internal_key"),
        errors.OpsConductorError("root error with internal detail /srv/app"),
    ],
    ids=["RuntimeError", "KeyError", "OpsConductorError"],
)
def test_unexpected_error_is_internal_and_leaks_nothing(exc: Exception) -> None:
    """An unexpected exception gives INTERNAL with a generic message and the request id only."""
    status = status_for_exception(exc, request_id=RID)
    assert status.code is Code.INTERNAL
    assert not is_expected(exc)
    rich = decode(status)
    for text in (status.details, rich.SerializeToString().decode("utf-8", "replace")):
        assert "hunter2" not in text
        assert "/srv/app" not in text
        assert "internal_key" not in text
        assert type(exc).__name__ not in text
    assert RID in status.details
    info = error_info(rich)
    assert info.reason == "INTERNAL"
    assert dict(info.metadata) == {"request_id": RID}
    assert len(rich.details) == 1


def test_storage_error_sends_its_default_message_not_the_driver_text() -> None:
    """A StorageError's own message may quote the driver (DSN, SQL): the caller gets the class's."""
    exc = errors.StorageError("connect to postgresql://app:s3cret@db:5432/x failed: SELECT ...")
    status = status_for_exception(exc, request_id=RID)
    assert status.code is Code.UNAVAILABLE
    assert status.details == "The database failed to complete the operation."
    assert "s3cret" not in decode(status).SerializeToString().decode("utf-8", "replace")


def test_a_secret_slipped_into_a_domain_message_is_masked() -> None:
    """Domain messages must not hold secrets; if one does anyway, the masker removes it."""
    exc = errors.NotFoundError("no such target (password=hunter2)")
    status = status_for_exception(exc, request_id=RID)
    assert "hunter2" not in status.details
    assert decode(status).message == status.details
