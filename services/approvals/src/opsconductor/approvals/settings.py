"""Settings of the approvals service: ``OPSC_*`` variables, defaults for ApprovalService.

Everything common (database, Redis, logging, JWT, ports) is documented on
:class:`opsconductor.common.settings.ServiceSettings`; this class only sets the approvals service's
defaults: gRPC on 50053.
"""

from __future__ import annotations

from pydantic import Field

from opsconductor.common.settings import ServiceSettings


class ApprovalsSettings(ServiceSettings):
    """Settings of the approvals service (gRPC port 50053 unless ``OPSC_GRPC_PORT`` is set)."""

    service_name: str = "approvals"
    grpc_port: int = Field(default=50053, ge=0, le=65535)
