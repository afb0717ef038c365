"""gRPC transport of the api service: ``ExecutionService``, ``AdminService``.

Protobuf in, domain calls, protobuf out; no business logic here.
"""

from __future__ import annotations

import grpc.aio

from opsconductor.api.app import ApiApp
from opsconductor.api.servicers.admin_servicer import add_admin_servicer
from opsconductor.api.servicers.execution_servicer import add_execution_servicer


def register_services(server: grpc.aio.Server, app: ApiApp) -> list[str]:
    """Add every servicer of the api service to ``server``; returns the full service names."""
    return [add_execution_servicer(server, app), add_admin_servicer(server, app)]
