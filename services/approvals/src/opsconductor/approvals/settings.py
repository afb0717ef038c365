"""Settings of the approvals service: ``OPSC_*`` variables, defaults for ApprovalService.

Everything common (database, Redis, logging, JWT, ports, ``worker_target``) is documented on
:class:`opsconductor.common.settings.ServiceSettings`; this class sets the approvals service's
defaults (gRPC on 50053) and its own fields:

* ``trusted_proxies`` — addresses or CIDR blocks (e.g. ``["10.0.0.0/8"]``, JSON in
  ``OPSC_TRUSTED_PROXIES``) of the proxies allowed to tell who the caller is through
  ``X-Forwarded-For``. A decision records the peer address unless the peer is one of them;
  then the right-most address of the header that is not a trusted proxy. Default: none (the
  header is ignored, so a caller cannot forge its recorded address).
* ``dispatch_margin_s`` — how much longer than the execution's policy the approvals service
  waits for the worker running an approved immediate execution.
* ``db_pool_size`` — database connections.
"""

from __future__ import annotations

from ipaddress import IPv4Network, IPv6Network, ip_network

from pydantic import Field, field_validator, model_validator

from opsconductor.common.settings import ServiceSettings


class ApprovalsSettings(ServiceSettings):
    """Settings of the approvals service (gRPC port 50053 unless ``OPSC_GRPC_PORT`` is set)."""

    service_name: str = "approvals"
    grpc_port: int = Field(default=50053, ge=0, le=65535)
    trusted_proxies: tuple[str, ...] = ()
    dispatch_margin_s: float = Field(default=15.0, gt=0)
    db_pool_size: int = Field(default=10, ge=1)

    @field_validator("trusted_proxies")
    @classmethod
    def _valid_networks(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for item in value:
            try:
                ip_network(item, strict=False)
            except ValueError:
                raise ValueError("each trusted proxy must be an IP address or CIDR") from None
        return value

    @property
    def trusted_proxy_networks(self) -> tuple[IPv4Network | IPv6Network, ...]:
        """``trusted_proxies`` parsed."""
        return tuple(ip_network(item, strict=False) for item in self.trusted_proxies)

    @model_validator(mode="after")
    def _forwarded_tokens_only_over_tls(self) -> ApprovalsSettings:
        # Forwards its callers' tokens to the worker (immediate runs): never in clear in production.
        self.require_tls_for_forwarded_tokens("client")
        return self
