"""The client's error mapper turns a quota refusal into a typed exception carrying the retry
delay the server sent (google.rpc.RetryInfo), and keeps working without one."""

from __future__ import annotations

import grpc
import grpc.aio
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

from opsconductor.client import (
    OpsConductorError,
    QuotaExceededError,
    ResourceExhaustedError,
    map_rpc_error,
)
from opsconductor.common import errors
from opsconductor.rpc.status import status_for_exception


def as_rpc_error(status: grpc.Status) -> grpc.aio.AioRpcError:
    """What a client sees when the server ended the call with ``status``."""
    return grpc.aio.AioRpcError(
        status.code,
        grpc.aio.Metadata(),
        grpc.aio.Metadata(*status.trailing_metadata),
        details=status.details,
    )


def with_error_info_only(metadata: dict[str, str]) -> grpc.aio.AioRpcError:
    """A RESOURCE_EXHAUSTED whose rich status has an ErrorInfo and no RetryInfo."""
    packed = any_pb2.Any()
    packed.Pack(error_details_pb2.ErrorInfo(reason="QUOTA_EXCEEDED", domain="d", metadata=metadata))
    rich = status_pb2.Status(code=8, message="m", details=[packed])
    return grpc.aio.AioRpcError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.aio.Metadata(),
        grpc.aio.Metadata(("grpc-status-details-bin", rich.SerializeToString())),
        details="m",
    )


def test_a_quota_refusal_becomes_quota_exceeded_with_its_retry_delay() -> None:
    sent = errors.QuotaExceededError(
        "tenant 'acme' has 20 immediate executions in flight, its limit (quota max_immediate)",
        retry_after_s=3.2,
        quota="immediate",
        limit=20,
        in_use=20,
    )
    got = map_rpc_error(as_rpc_error(status_for_exception(sent, request_id="r-1")))
    assert isinstance(got, QuotaExceededError)
    assert got.retry_after_s == 3.2
    assert got.message == sent.message
    assert (got.details["quota"], got.details["limit"]) == ("immediate", "20")
    assert got.details["retry_after_s"] == "3.2"


def test_without_retry_info_the_errorinfo_delay_is_used() -> None:
    got = map_rpc_error(with_error_info_only({"retry_after_s": "7"}))
    assert isinstance(got, QuotaExceededError)
    assert got.retry_after_s == 7.0


def test_an_unparseable_hint_is_no_hint() -> None:
    got = map_rpc_error(with_error_info_only({"retry_after_s": "soon"}))
    assert isinstance(got, QuotaExceededError)
    assert got.retry_after_s is None


def test_a_bare_resource_exhausted_is_a_resource_exhausted_error_without_delay() -> None:
    """E.g. grpcio's own refusal of a message over the size limit: no rich status at all."""
    error = grpc.aio.AioRpcError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.aio.Metadata(),
        grpc.aio.Metadata(),
        details="Received message larger than max",
    )
    got = map_rpc_error(error)
    assert type(got) is ResourceExhaustedError
    assert isinstance(got, OpsConductorError)
    assert got.retry_after_s is None
