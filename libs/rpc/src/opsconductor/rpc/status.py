"""Domain errors → gRPC status: the one mapping every service uses.

Servicers and service logic raise the domain exceptions of :mod:`opsconductor.common.errors`;
the server interceptor hands whatever escapes an RPC to :func:`status_for_exception`, which picks
the status code from the contract's table (:mod:`opsconductor.contract.status_codes`, the same
table the client maps statuses back with) and attaches a ``google.rpc.Status``
with an ``ErrorInfo`` (machine-readable ``reason``, our ``domain``, safe details as strings),
``BadRequest`` field violations for invalid plans and a ``RetryInfo`` (how long to wait) for a
refusal that knows it (a quota). Clients decode it with
``grpc_status.rpc_status.from_call``.

Anything that is not a domain error is a bug or an outage we did not model: the caller gets
``INTERNAL`` with a generic message and the request id, never ``str(exc)`` and never a traceback.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NoReturn, Protocol, cast

import grpc
import grpc.aio
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from opsconductor.common import errors
from opsconductor.common.masking import mask
from opsconductor.contract.metadata import REQUEST_ID_METADATA_KEY
from opsconductor.contract.status_codes import ERROR_DOMAIN, INTERNAL_REASON, code_for_error

__all__ = [
    "ERROR_DOMAIN",
    "INTERNAL_REASON",
    "abort_with_status",
    "code_for_exception",
    "is_expected",
    "status_for_exception",
]

# Errors whose instance message may carry internals (driver text): callers get the docstring.
_OPAQUE: tuple[type[errors.OpsConductorError], ...] = (errors.StorageError,)

_MAX_DETAIL_CHARS = 512


@dataclass(frozen=True)
class _Status(grpc.Status):
    """A concrete ``grpc.Status`` (the grpc one is an abstract attribute holder)."""

    code: grpc.StatusCode
    details: str
    trailing_metadata: tuple[tuple[str, str | bytes], ...]


class _StatusAbortingContext(Protocol):
    # grpc-stubs lacks abort_with_status on grpc.aio.ServicerContext; grpcio has had it since 1.38.
    async def abort_with_status(self, status: grpc.Status) -> NoReturn: ...


def _unstorable_input(exc: BaseException) -> bool:
    """A storage failure caused by a value no column can hold (SQLSTATE class 22, "data
    exception": too long, NUL character, out of range): the request is at fault, not the
    database, so the answer is INVALID_ARGUMENT, never UNAVAILABLE. The backstop behind the
    edge's own checks."""
    cause = exc.__cause__
    return isinstance(exc, errors.StorageError) and str(getattr(cause, "sqlstate", "")).startswith(
        "22"
    )


_UNSTORABLE_MESSAGE = (
    "a value of the request cannot be stored: it is too long, out of range or contains NUL "
    "characters"
)


def code_for_exception(exc: BaseException) -> grpc.StatusCode:
    """Return the status code an exception escaping an RPC is reported with."""
    if _unstorable_input(exc):
        return grpc.StatusCode.INVALID_ARGUMENT
    return code_for_error(exc)


def is_expected(exc: BaseException) -> bool:
    """True when ``exc`` is a modelled domain error (anything else is logged as a bug)."""
    return code_for_exception(exc) is not grpc.StatusCode.INTERNAL


def status_for_exception(exc: BaseException, *, request_id: str) -> grpc.Status:
    """Map an exception that escaped an RPC to the rich ``grpc.Status`` sent to the caller.

    The status carries a ``google.rpc.Status`` (code, message, ``ErrorInfo`` and, for an invalid
    plan, ``BadRequest``) in the ``grpc-status-details-bin`` trailer, and the request id in the
    ``x-request-id`` trailer.
    """
    described = describe_exception(exc, request_id=request_id)
    details: list[Any] = []
    if described.violations:
        details.append(_bad_request(described.violations))
    if described.retry_after_s is not None:
        details.append(_retry_info(described.retry_after_s))
    return _rich_status(
        described.code,
        described.message,
        described.reason,
        described.metadata,
        request_id,
        details,
    )


@dataclass(frozen=True)
class DescribedError:
    """What a caller is told about an exception, on any transport (gRPC status, HTTP JSON)."""

    code: grpc.StatusCode
    reason: str
    message: str
    #: Safe details as bounded strings, secrets masked, with the request id.
    metadata: dict[str, str]
    #: Field violations of an invalid request: ``(field, description)``.
    violations: tuple[tuple[str, str], ...] = ()
    #: How long the caller should wait before retrying (a quota refusal), when known.
    retry_after_s: float | None = None


def describe_exception(exc: BaseException, *, request_id: str) -> DescribedError:
    """The code, reason, caller-safe message and details an exception is reported with."""
    code = code_for_exception(exc)
    if code is grpc.StatusCode.INTERNAL or not isinstance(exc, errors.OpsConductorError):
        reason = exc.reason if isinstance(exc, errors.OpsConductorError) else INTERNAL_REASON
        message = f"Internal error; quote request id {request_id} when reporting it"
        return DescribedError(code, reason, message, _safe_metadata({}, request_id))
    if _unstorable_input(exc):
        return DescribedError(
            code, "UNSTORABLE_VALUE", _UNSTORABLE_MESSAGE, _safe_metadata({}, request_id)
        )
    # Domain messages are caller-facing by contract; masking them too costs little.
    message = _default_message(exc) if isinstance(exc, _OPAQUE) else mask(exc.message)
    violations: tuple[tuple[str, str], ...] = ()
    if isinstance(exc, errors.PlanValidationError):
        violations = tuple((v.field, v.description) for v in exc.violations)
    retry_after_s = exc.retry_after_s if isinstance(exc, errors.ResourceExhaustedError) else None
    return DescribedError(
        code,
        exc.reason,
        message,
        _safe_metadata(exc.details, request_id),
        violations,
        retry_after_s,
    )


async def abort_with_status(
    context: grpc.aio.ServicerContext[Any, Any], status: grpc.Status
) -> NoReturn:
    """End the RPC with ``status`` (raises ``grpc.aio.AbortError``, which must propagate)."""
    await cast(_StatusAbortingContext, context).abort_with_status(status)


def _rich_status(
    code: grpc.StatusCode,
    message: str,
    reason: str,
    metadata: Mapping[str, str],
    request_id: str,
    extra: list[Any] | None = None,
) -> grpc.Status:
    info = error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN, metadata=metadata)
    packed = []
    for detail in (info, *(extra or ())):
        any_detail = any_pb2.Any()
        any_detail.Pack(detail)
        packed.append(any_detail)
    proto = status_pb2.Status(code=_proto_code(code), message=message, details=packed)
    base = rpc_status.to_status(proto)
    return _Status(
        code=base.code,
        details=base.details,
        trailing_metadata=(*base.trailing_metadata, (REQUEST_ID_METADATA_KEY, request_id)),
    )


def _proto_code(code: grpc.StatusCode) -> int:
    # grpc.StatusCode values are (google.rpc.Code number, name) pairs.
    return int(code.value[0])


def _safe_metadata(details: Mapping[str, object], request_id: str) -> dict[str, str]:
    """``ErrorInfo.metadata``: details as bounded strings, secrets masked, ``None`` dropped."""
    metadata: dict[str, str] = {}
    for key, value in mask(dict(details)).items():
        if value is None:
            continue
        text = value if isinstance(value, str) else str(value)
        metadata[str(key)] = text[:_MAX_DETAIL_CHARS]
    metadata["request_id"] = request_id
    return metadata


def _bad_request(violations: tuple[tuple[str, str], ...]) -> error_details_pb2.BadRequest:
    return error_details_pb2.BadRequest(
        field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=field, description=description)
            for field, description in violations
        ]
    )


def _retry_info(seconds: float) -> error_details_pb2.RetryInfo:
    delay = duration_pb2.Duration()
    delay.FromMilliseconds(max(int(seconds * 1000), 0))
    return error_details_pb2.RetryInfo(retry_delay=delay)


def _default_message(exc: errors.OpsConductorError) -> str:
    # The class docstring's first paragraph is its default message (see errors.py).
    doc = inspect.cleandoc(type(exc).__doc__ or "")
    return " ".join(doc.split("\n\n", 1)[0].split()) or type(exc).__name__
