"""Settings of the api service: ``OPSC_*`` variables, ExecutionService, AdminService.

Everything common (database, Redis, logging, JWT, ports) is documented on
:class:`opsconductor.common.settings.ServiceSettings`; this class only sets the api service's
defaults: gRPC on 50051.
"""

from __future__ import annotations

from pydantic import Field

from opsconductor.common.settings import ServiceSettings


class ApiSettings(ServiceSettings):
    """Settings of the api service (gRPC port 50051 unless ``OPSC_GRPC_PORT`` is set)."""

    service_name: str = "api"
    grpc_port: int = Field(default=50051, ge=0, le=65535)
