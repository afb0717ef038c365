"""gRPC transport of the approvals service: ``ApprovalService``.

Protobuf in, domain calls, protobuf out; no business logic here.
"""

from __future__ import annotations

import grpc.aio

from opsconductor.approvals.app import ApprovalsApp
from opsconductor.approvals.servicers.approval_servicer import add_approval_servicer


def register_services(server: grpc.aio.Server, app: ApprovalsApp) -> list[str]:
    """Add every servicer of the approvals service to ``server``; returns the full service names."""
    return [add_approval_servicer(server, app)]
