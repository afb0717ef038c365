"""Settings of the progress service: ``OPSC_*`` variables, defaults for ProgressService.

Everything common (database, Redis, logging, JWT, ports) is documented on
:class:`opsconductor.common.settings.ServiceSettings`; this class sets the progress service's
defaults (gRPC on 50054, HTTP — WebSocket, SSE, long-poll, grpc-web and the UI — on 8080) and
its own limits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr

from opsconductor.common.settings import ServiceSettings


class ProgressSettings(ServiceSettings):
    """Settings of the progress service (gRPC port 50054 unless ``OPSC_GRPC_PORT`` is set).

    Attributes:
        http_host / http_port: where the HTTP side listens (``OPSC_HTTP_HOST``/``_PORT``).
        http_port_file: where the HTTP server writes the port it bound (with port 0).
        max_subscribers: live subscriptions (every transport) this process serves at once.
        max_subscribers_per_tenant: live subscriptions of one tenant in this process.
        subscriber_buffer: events buffered per subscriber before it is cut off as too slow.
        sse_heartbeat_s: idle time after which SSE and WebSocket send a heartbeat.
        long_poll_max_wait_s: the longest ``wait_s`` a long-poll may ask for.
        stream_ticket_key: HMAC key of the short-lived stream tickets a browser passes as
            ``?ticket=`` (EventSource and WebSocket cannot send headers); replicas share it.
            Unset: a random key per process. Secret.
        stream_ticket_ttl_s: how long a stream ticket is valid.
        event_loop: ``uvloop`` (default: fewer CPU microseconds per delivered event, hence lower
            fan-out latency) or ``asyncio`` (the standard library's loop, to rule uvloop out when
            diagnosing); ``OPSC_EVENT_LOOP``.
        api_target / approvals_target: gRPC addresses the grpc-web bridge forwards
            ExecutionService and ApprovalService calls to.
    """

    service_name: str = "progress"
    grpc_port: int = Field(default=50054, ge=0, le=65535)
    #: Every open StreamEvents counts as an RPC in flight: room for many watchers.
    grpc_max_concurrent_rpcs: int = Field(default=2048, ge=1)
    http_host: str = "127.0.0.1"
    http_port: int = Field(default=8080, ge=0, le=65535)
    http_port_file: Path | None = None
    max_subscribers: int = Field(default=5000, ge=1)
    max_subscribers_per_tenant: int = Field(default=500, ge=1)
    subscriber_buffer: int = Field(default=1000, ge=1)
    sse_heartbeat_s: float = Field(default=15.0, gt=0)
    long_poll_max_wait_s: float = Field(default=30.0, gt=0, le=300)
    stream_ticket_key: SecretStr | None = None
    stream_ticket_ttl_s: int = Field(default=60, gt=0, le=600)
    event_loop: Literal["uvloop", "asyncio"] = "uvloop"
    api_target: str = "127.0.0.1:50051"
    approvals_target: str = "127.0.0.1:50053"
    db_pool_size: int = Field(default=20, ge=1)
