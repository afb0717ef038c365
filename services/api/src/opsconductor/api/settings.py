"""Settings of the api service: ``OPSC_*`` variables, ExecutionService, AdminService.

Everything common (database, Redis, logging, JWT, ports) is documented on
:class:`opsconductor.common.settings.ServiceSettings`; this class only sets the api service's
defaults: gRPC on 50051.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator

from opsconductor.common.settings import ServiceSettings


class ApiSettings(ServiceSettings):
    """Settings of the api service (gRPC port 50051 unless ``OPSC_GRPC_PORT`` is set)."""

    service_name: str = "api"
    grpc_port: int = Field(default=50051, ge=0, le=65535)
    #: Approval policy YAML (levels per action class, step-by-step rules); None: built-in.
    approval_policy_file: Path | None = None
    #: Seconds feature flags are cached (a change is also pushed by LISTEN/NOTIFY).
    flag_cache_ttl_s: float = Field(default=2.0, gt=0)
    db_pool_size: int = Field(default=20, ge=1)
    #: Seconds between refreshes of the queue, DLQ and approvals gauges (docs/observability.md).
    gauge_refresh_s: float = Field(default=5.0, gt=0)

    @model_validator(mode="after")
    def _forwarded_tokens_only_over_tls(self) -> ApiSettings:
        # Forwards its callers' tokens to the worker (immediate runs): never in clear in production.
        self.require_tls_for_forwarded_tokens("client")
        return self
