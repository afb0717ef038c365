"""The one table between domain errors and gRPC status codes, read by both sides of the wire.

The servers turn an exception that escapes an RPC into the status of the first row whose class
it is an instance of (``opsconductor.rpc.status``); the client turns a status back into
the class its ``ErrorInfo.reason`` names and, when the reason is unknown (an older server, a
proxy, a bare status), into the row marked ``fallback`` for that code
(``opsconductor.client.errors``). Keeping both directions here means a new error class needs
one row, and the two sides cannot drift apart.

AIP-193 guides the codes: retry the call → ``UNAVAILABLE``, retry the sequence → ``ABORTED``,
fix the state first → ``FAILED_PRECONDITION``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

import grpc

from opsconductor.contract import errors as e

__all__ = [
    "ERROR_DOMAIN",
    "INTERNAL_REASON",
    "STATUS_TABLE",
    "StatusRow",
    "class_for_code",
    "class_for_reason",
    "code_for_error",
    "error_classes",
]

ERROR_DOMAIN: Final = "execution.opsconductor.io"
"""``ErrorInfo.domain`` of every error this system returns."""

INTERNAL_REASON: Final = "INTERNAL"
"""``ErrorInfo.reason`` of errors nobody expected (bugs, unmodelled outages)."""


@dataclass(frozen=True)
class StatusRow:
    """One error class, its status code, and whether a bare status of that code becomes it."""

    error: type[e.OpsConductorError]
    code: grpc.StatusCode
    #: The class a status of ``code`` with an unknown reason is mapped back to by the client.
    fallback: bool = False


# Checked in order, so a subclass listed before its base wins. Subclasses of
# FailedPreconditionError (FSMError, ApprovalInvalidatedError, FeatureDisabledError, ...) and of
# InvalidArgumentError (PlanValidationError) map through their base. UNAVAILABLE has no
# fallback on purpose: a bare UNAVAILABLE is usually the transport (server unreachable), which
# the client reports as such rather than as a queue or database outage.
STATUS_TABLE: Final[tuple[StatusRow, ...]] = (
    StatusRow(e.InvalidArgumentError, grpc.StatusCode.INVALID_ARGUMENT, fallback=True),
    StatusRow(e.AuthenticationError, grpc.StatusCode.UNAUTHENTICATED, fallback=True),
    StatusRow(e.PermissionDeniedError, grpc.StatusCode.PERMISSION_DENIED, fallback=True),
    StatusRow(e.NotFoundError, grpc.StatusCode.NOT_FOUND, fallback=True),
    # Concurrency conflicts: the caller retries the whole sequence (read, decide, write).
    StatusRow(e.ResourceBusyError, grpc.StatusCode.ABORTED),
    StatusRow(e.ConflictError, grpc.StatusCode.ABORTED, fallback=True),
    StatusRow(e.StaleLeaseError, grpc.StatusCode.ABORTED),
    StatusRow(e.FailedPreconditionError, grpc.StatusCode.FAILED_PRECONDITION, fallback=True),
    # A limit (subscribers per tenant or process, the server's RPCs in flight): retry later.
    StatusRow(e.ResourceExhaustedError, grpc.StatusCode.RESOURCE_EXHAUSTED, fallback=True),
    StatusRow(e.QueueUnavailableError, grpc.StatusCode.UNAVAILABLE),
    StatusRow(e.WorkerUnavailableError, grpc.StatusCode.UNAVAILABLE),
    StatusRow(e.UnimplementedError, grpc.StatusCode.UNIMPLEMENTED),
    StatusRow(e.ExecutionTimeoutError, grpc.StatusCode.DEADLINE_EXCEEDED, fallback=True),
    # The database being unreachable is worth a retry of the call.
    StatusRow(e.StorageError, grpc.StatusCode.UNAVAILABLE),
)


def code_for_error(error: BaseException) -> grpc.StatusCode:
    """The status code ``error`` is reported with (``INTERNAL`` for anything unmodelled)."""
    if isinstance(error, e.OpsConductorError):
        for row in STATUS_TABLE:
            if isinstance(error, row.error):
                return row.code
    return grpc.StatusCode.INTERNAL


def _walk(cls: type[e.OpsConductorError]) -> Iterator[type[e.OpsConductorError]]:
    for sub in cls.__subclasses__():
        yield sub
        yield from _walk(sub)


def error_classes() -> tuple[type[e.OpsConductorError], ...]:
    """Every error class of the contract (those of :mod:`opsconductor.contract.errors`)."""
    return tuple(cls for cls in _walk(e.OpsConductorError) if cls.__module__ == e.__name__)


def _by_reason() -> dict[str, type[e.OpsConductorError]]:
    # A subclass may report as its base (same reason): the base, met first, is the one mapped.
    by_reason: dict[str, type[e.OpsConductorError]] = {}
    for cls in error_classes():
        by_reason.setdefault(cls.reason, cls)
    return by_reason


_BY_REASON: Final = _by_reason()
_BY_CODE: Final = {row.code: row.error for row in STATUS_TABLE if row.fallback}


def class_for_reason(reason: str) -> type[e.OpsConductorError] | None:
    """The contract's class for an ``ErrorInfo.reason`` (``None`` when it names none)."""
    return _BY_REASON.get(reason)


def class_for_code(code: grpc.StatusCode) -> type[e.OpsConductorError] | None:
    """The class a status of ``code`` with no known reason is mapped to (``None``: none)."""
    return _BY_CODE.get(code)
