"""The gRPC contracts follow the buf style guide and are importable under their proto package."""

from __future__ import annotations

import re

import pytest
from google.protobuf.descriptor import FileDescriptor

from opsconductor.execution.v1 import (
    admin_service_pb2,
    approval_service_pb2,
    execution_service_pb2,
    progress_service_pb2,
    types_pb2,
    worker_service_pb2,
)

FILES: list[FileDescriptor] = [
    m.DESCRIPTOR
    for m in (
        types_pb2,
        execution_service_pb2,
        admin_service_pb2,
        worker_service_pb2,
        approval_service_pb2,
        progress_service_pb2,
    )
]

EXPECTED_RPCS = {
    "ExecutionService": {
        "SubmitExecution",
        "GetExecution",
        "ListExecutions",
        "CancelExecution",
        "PreviewPlan",
    },
    "AdminService": {
        "GetFeatureFlags",
        "UpdateFeatureFlags",
        "ListDlqEntries",
        "RequeueDlqEntry",
        "GetQueueStats",
        "SetDrain",
        "VerifyAuditChain",
        "ListFlagChanges",
    },
    "WorkerService": {"RunImmediate"},
    "ApprovalService": {"GetApproval", "ListPendingApprovals", "Approve", "Reject", "ApproveStep"},
    "ProgressService": {"StreamEvents", "ListEvents"},
}


def _screaming(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).upper()


@pytest.mark.parametrize("fd", FILES, ids=lambda fd: fd.name)
def test_package_matches_folder_and_file_names_are_snake_case(fd: FileDescriptor) -> None:
    assert fd.package == "opsconductor.execution.v1"
    assert fd.name.startswith("opsconductor/execution/v1/")
    assert re.fullmatch(r"[a-z0-9_/]+\.proto", fd.name)


@pytest.mark.parametrize("fd", FILES, ids=lambda fd: fd.name)
def test_enums_are_prefixed_and_start_with_unspecified(fd: FileDescriptor) -> None:
    for enum in fd.enum_types_by_name.values():
        prefix = _screaming(enum.name) + "_"
        assert enum.values[0].number == 0
        assert enum.values[0].name == prefix + "UNSPECIFIED"
        for value in enum.values:
            assert value.name.startswith(prefix), value.name


def test_every_service_has_the_expected_rpcs_with_own_request_and_response() -> None:
    services = {s.name: s for fd in FILES for s in fd.services_by_name.values()}
    assert set(services) == set(EXPECTED_RPCS)
    seen_types: set[str] = set()
    for name, service in services.items():
        assert name.endswith("Service")
        assert {m.name for m in service.methods} == EXPECTED_RPCS[name]
        for method in service.methods:
            assert method.input_type.name == f"{method.name}Request"
            assert method.output_type.name == f"{method.name}Response"
            for t in (method.input_type.full_name, method.output_type.full_name):
                assert t not in seen_types, f"{t} is shared between RPCs"
                seen_types.add(t)


def test_stream_events_is_server_streaming_with_after_seq() -> None:
    method = progress_service_pb2.DESCRIPTOR.services_by_name["ProgressService"].methods_by_name[
        "StreamEvents"
    ]
    assert method.server_streaming
    assert not method.client_streaming
    assert "after_seq" in method.input_type.fields_by_name
