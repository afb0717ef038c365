"""Settings of the progress service: ``OPSC_*`` variables, defaults for ProgressService.

Everything common (database, Redis, logging, JWT, ports) is documented on
:class:`opsconductor.common.settings.ServiceSettings`; this class only sets the progress service's
defaults: gRPC on 50054 and HTTP (WebSocket, SSE, long-poll, UI) on 8080.
"""

from __future__ import annotations

from pydantic import Field

from opsconductor.common.settings import ServiceSettings


class ProgressSettings(ServiceSettings):
    """Settings of the progress service (gRPC port 50054 unless ``OPSC_GRPC_PORT`` is set)."""

    service_name: str = "progress"
    grpc_port: int = Field(default=50054, ge=0, le=65535)
    #: Port of the HTTP side (WebSocket, SSE, long-poll and the UI page): ``OPSC_HTTP_PORT``.
    http_port: int = Field(default=8080, ge=0, le=65535)
    #: Every open StreamEvents counts as an RPC in flight: room for many watchers.
    grpc_max_concurrent_rpcs: int = Field(default=2048, ge=1)
