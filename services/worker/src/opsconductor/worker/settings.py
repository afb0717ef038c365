"""Settings of the worker service: ``OPSC_*`` variables, defaults for WorkerService.

Everything common (database, Redis, logging, JWT, ports) is documented on
:class:`opsconductor.common.settings.ServiceSettings`; this class only sets the worker service's
defaults: gRPC on 50052.
"""

from __future__ import annotations

from pydantic import Field

from opsconductor.common.settings import ServiceSettings


class WorkerSettings(ServiceSettings):
    """Settings of the worker service (gRPC port 50052 unless ``OPSC_GRPC_PORT`` is set)."""

    service_name: str = "worker"
    grpc_port: int = Field(default=50052, ge=0, le=65535)
    #: Identity written to executions this worker runs; default ``<hostname>:<pid>``.
    worker_id: str | None = Field(default=None, max_length=100)
    db_pool_size: int = Field(default=20, ge=1)
    #: Background jobs run at once by this worker (0: do not consume the queue).
    consumer_concurrency: int = Field(default=4, ge=0, le=256)
    #: Idle poll interval of the queue consumer, in seconds.
    consumer_poll_interval_s: float = Field(default=0.1, gt=0)
