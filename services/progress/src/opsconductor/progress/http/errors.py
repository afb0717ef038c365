"""Domain errors → HTTP answers: the status, and a JSON body a person can act on.

The code, reason and message are the ones gRPC callers get
(:func:`opsconductor.rpc.status.describe_exception`), so a refusal reads the same on every
transport; unexpected errors say only "internal error" with the request id, and are logged.
"""

from __future__ import annotations

import secrets
from typing import Any

import grpc
import structlog

from opsconductor.rpc.status import DescribedError, describe_exception, is_expected

log = structlog.get_logger(__name__)

_HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.FAILED_PRECONDITION: 412,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}

#: WebSocket close codes: 4000 + the HTTP status (the 4000-4999 range is the application's).
WS_CLOSE_BASE = 4000


def describe(exc: BaseException, *, route: str) -> tuple[int, dict[str, Any]]:
    """The HTTP status and JSON body for an exception escaping ``route``."""
    request_id = secrets.token_hex(8)
    if not is_expected(exc):
        log.error("http_request_failed", route=route, request_id=request_id, exc_info=exc)
    described = describe_exception(exc, request_id=request_id)
    return _HTTP_STATUS.get(described.code, 500), {"error": _body(described)}


def _body(described: DescribedError) -> dict[str, Any]:
    body: dict[str, Any] = {
        "code": described.code.name,
        "reason": described.reason,
        "message": described.message,
        "details": described.metadata,
    }
    if described.violations:
        body["field_violations"] = [
            {"field": field, "description": description}
            for field, description in described.violations
        ]
    return body
