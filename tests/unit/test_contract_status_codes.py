"""One table between errors and status codes: the server's status and the client's exception
are both read from ``opsconductor.contract.status_codes``, so every error survives the wire."""

from __future__ import annotations

import grpc
import grpc.aio
import pytest

from opsconductor.client.errors import RpcError, map_rpc_error
from opsconductor.common import errors as common_errors
from opsconductor.contract import errors as e
from opsconductor.contract.status_codes import (
    STATUS_TABLE,
    class_for_code,
    class_for_reason,
    code_for_error,
    error_classes,
)
from opsconductor.rpc.status import code_for_exception, status_for_exception

CLASSES = error_classes()


def _over_the_wire(status: grpc.Status) -> grpc.aio.AioRpcError:
    """What the client receives for ``status``: an AioRpcError with the same trailers."""
    return grpc.aio.AioRpcError(
        status.code,
        grpc.aio.Metadata(),
        grpc.aio.Metadata(*status.trailing_metadata),
        details=status.details,
    )


def _instance(cls: type[e.OpsConductorError]) -> e.OpsConductorError:
    if issubclass(cls, e.PlanValidationError):
        return cls(violations=[e.FieldViolation("steps[0].id", "must be set")])
    return cls()


def test_common_errors_are_the_contract_classes() -> None:
    """The servers' ``opsconductor.common.errors`` re-exports the very same classes."""
    assert common_errors.ResourceBusyError is e.ResourceBusyError
    assert set(common_errors.__all__) == set(e.__all__)


def test_every_contract_class_has_a_status_other_than_internal() -> None:
    """Each error class of the contract maps to a modelled status code through the table."""
    assert CLASSES, "the contract defines error classes"
    for cls in CLASSES:
        assert code_for_error(_instance(cls)) is not grpc.StatusCode.INTERNAL, cls.__name__


def test_the_server_mapping_is_the_table() -> None:
    """The server's code for each class is the table's (no second table on the server)."""
    for cls in CLASSES:
        error = _instance(cls)
        assert code_for_exception(error) is code_for_error(error)
    assert code_for_exception(ValueError("boom")) is grpc.StatusCode.INTERNAL


@pytest.mark.parametrize("cls", CLASSES, ids=lambda cls: cls.__name__)
def test_each_error_comes_back_as_its_own_class(cls: type[e.OpsConductorError]) -> None:
    """Server status → wire → client: the client raises the class the server raised."""
    status = status_for_exception(_instance(cls), request_id="r-1")
    mapped = map_rpc_error(_over_the_wire(status))
    assert type(mapped) is cls
    if isinstance(mapped, e.PlanValidationError):
        assert [str(v) for v in mapped.violations] == ["steps[0].id: must be set"]


def test_a_bare_status_falls_back_to_the_rows_marked_fallback() -> None:
    """No ErrorInfo (an old server, a proxy): the code picks the class marked ``fallback``;
    UNAVAILABLE, INTERNAL and UNIMPLEMENTED stay an RpcError that names the code."""
    fallbacks = {row.code: row.error for row in STATUS_TABLE if row.fallback}
    assert len(fallbacks) == len([row for row in STATUS_TABLE if row.fallback]), "one per code"
    for code, cls in fallbacks.items():
        bare = grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details="x")
        assert type(map_rpc_error(bare)) is cls
        assert class_for_code(code) is cls
    for code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL):
        bare = grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details="x")
        mapped = map_rpc_error(bare)
        assert isinstance(mapped, RpcError)
        assert mapped.details["code"] == code.name


def test_reasons_name_only_contract_classes() -> None:
    """A reason maps back only to a class of the contract; unknown reasons map to nothing."""
    for cls in CLASSES:
        assert class_for_reason(cls.reason) is cls
    assert class_for_reason("NO_SUCH_REASON") is None
    assert class_for_reason(RpcError.reason) is None
