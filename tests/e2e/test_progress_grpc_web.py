"""grpc-web served by the progress process, spoken on the wire as a browser does (frames built
by hand here, so the test does not trust the server's library): ProgressService from the
process's own logic, ExecutionService and ApprovalService bridged to their services with the
caller's token, refusals with their status, message and ErrorInfo reason."""

from __future__ import annotations

import base64
import struct
import urllib.parse
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TypeVar

import asyncpg
import httpx
import pytest
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2

from opsconductor.execution.v1 import (
    approval_service_pb2,
    execution_service_pb2,
    progress_service_pb2,
)
from opsconductor.lifecycle.storage.flags import update_flags

from .conftest import Tenant, running_stack, token
from .plans import plan, probe_step
from .stack import Stack

M = TypeVar("M", bound=Message)


@pytest.fixture(scope="module")
async def stack(e2e_dsn: str, e2e_pool: asyncpg.Pool, redis_url: str) -> AsyncIterator[Stack]:
    await update_flags(e2e_pool, {"max_approval_level": 3}, by="e2e")
    async with running_stack(e2e_dsn, redis_url, with_approvals=True, with_progress=True) as s:
        yield s


async def grpc_web(
    tenant: Tenant, method: str, request: Message, response_type: type[M], actor: str | None
) -> tuple[list[M], dict[str, str]]:
    """One grpc-web call: the response messages and the trailers (grpc-status, ...)."""
    body = request.SerializeToString()
    headers = {"content-type": "application/grpc-web+proto", "x-grpc-web": "1"}
    if actor is not None:
        headers["authorization"] = f"Bearer {token(actor, tenant.id)}"
    url = (
        f"http://127.0.0.1:{tenant.stack.http_port('progress')}/opsconductor.execution.v1.{method}"
    )
    async with httpx.AsyncClient(timeout=60) as http:
        reply = await http.post(
            url, content=b"\x00" + struct.pack(">I", len(body)) + body, headers=headers
        )
    assert reply.status_code == 200
    assert reply.headers["content-type"].startswith("application/grpc-web")
    messages: list[M] = []
    trailers = {k: v for k, v in reply.headers.items() if k.startswith("grpc-")}
    data = reply.content
    while data:
        flag, length = data[0], struct.unpack(">I", data[1:5])[0]
        frame, data = data[5 : 5 + length], data[5 + length :]
        if flag & 0x80:
            for line in frame.decode().split("\r\n"):
                if line:
                    key, _, value = line.partition(":")
                    trailers[key.strip().lower()] = value.strip()
        else:
            messages.append(response_type.FromString(frame))
    return messages, trailers


def error_reason(trailers: dict[str, str]) -> str:
    raw = trailers["grpc-status-details-bin"]
    status = status_pb2.Status.FromString(base64.b64decode(raw + "=" * (-len(raw) % 4)))
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    return info.reason


async def test_lists_and_event_streams_over_grpc_web(tenant: Tenant, ledger: Path) -> None:
    """ListExecutions (bridged to the api) finds a submitted execution; StreamEvents (this
    process's logic) streams it to execution_completed and ends with grpc-status 0;
    ListEvents pages the same events."""
    async with tenant.client("alice") as client:
        submitted = await client.submit(
            plan(probe_step("s1", ["web-1"], ledger, hold_s=0.1, estimate_ms=11_000), sla="medium"),
            tenant_id=tenant.id,
        )
    listed, trailers = await grpc_web(
        tenant,
        "ExecutionService/ListExecutions",
        execution_service_pb2.ListExecutionsRequest(tenant_id=tenant.id),
        execution_service_pb2.ListExecutionsResponse,
        "vera",
    )
    assert trailers["grpc-status"] == "0"
    assert submitted.execution_id in [e.execution_id for e in listed[0].executions]
    streamed, trailers = await grpc_web(
        tenant,
        "ProgressService/StreamEvents",
        progress_service_pb2.StreamEventsRequest(
            tenant_id=tenant.id, execution_id=submitted.execution_id
        ),
        progress_service_pb2.StreamEventsResponse,
        "vera",
    )
    assert trailers["grpc-status"] == "0"
    types = [m.event.type for m in streamed]
    assert types[0] == "execution_started"
    assert types[-1] == "execution_completed"
    pages, _ = await grpc_web(
        tenant,
        "ProgressService/ListEvents",
        progress_service_pb2.ListEventsRequest(
            tenant_id=tenant.id, execution_id=submitted.execution_id
        ),
        progress_service_pb2.ListEventsResponse,
        "vera",
    )
    assert [e.seq for e in pages[0].events][: len(streamed)] == [m.event.seq for m in streamed]


async def test_refusals_keep_their_status_message_and_reason(tenant: Tenant, ledger: Path) -> None:
    """No token: UNAUTHENTICATED (16). Another tenant's listing: PERMISSION_DENIED (7) with its
    reason. Self-approval through the bridge: FAILED_PRECONDITION with the approvals service's
    message and SELF_APPROVAL_FORBIDDEN."""
    _, anonymous = await grpc_web(
        tenant,
        "ProgressService/ListEvents",
        progress_service_pb2.ListEventsRequest(tenant_id=tenant.id),
        progress_service_pb2.ListEventsResponse,
        None,
    )
    assert anonymous["grpc-status"] == "16"
    _, foreign = await grpc_web(
        tenant,
        "ExecutionService/ListExecutions",
        execution_service_pb2.ListExecutionsRequest(tenant_id="someone-else"),
        execution_service_pb2.ListExecutionsResponse,
        "vera",
    )
    assert foreign["grpc-status"] == "7"
    assert error_reason(foreign) == "PERMISSION_DENIED"
    async with tenant.client("ada") as client:  # an admin: may approve, not her own request
        submitted = await client.submit(
            plan(probe_step("r", ["db-9"], ledger, action_class="modify")), tenant_id=tenant.id
        )
    assert submitted.status == "awaiting_approval"
    pending, _ = await grpc_web(
        tenant,
        "ApprovalService/ListPendingApprovals",
        approval_service_pb2.ListPendingApprovalsRequest(tenant_id=tenant.id),
        approval_service_pb2.ListPendingApprovalsResponse,
        "ada",
    )
    approval = next(a for a in pending[0].approvals if a.execution_id == submitted.execution_id)
    _, own = await grpc_web(
        tenant,
        "ApprovalService/Approve",
        approval_service_pb2.ApproveRequest(
            tenant_id=tenant.id, approval_id=approval.approval_id, comment="mine"
        ),
        approval_service_pb2.ApproveResponse,
        "ada",
    )
    assert own["grpc-status"] == "9"
    assert error_reason(own) == "SELF_APPROVAL_FORBIDDEN"
    assert "approve" in urllib.parse.unquote(own["grpc-message"]).lower()
