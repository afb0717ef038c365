"""Settings of the worker service: ``OPSC_*`` variables, defaults for WorkerService.

Everything common (database, Redis, logging, JWT, ports) is documented on
:class:`opsconductor.common.settings.ServiceSettings`; this class only sets the worker service's
defaults: gRPC on 50052, and one rule of its own: the api and the approvals service forward
their caller's bearer token here, so a worker verifying tokens of an identity provider (an
RS256 key or a JWKS URL: production) refuses to start without TLS — a user token must never
cross the network in clear (``allow_insecure_dev`` aside). See ``docs/security.md``,
"Transport security and tokens".
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator

from opsconductor.common.settings import ServiceSettings


class WorkerSettings(ServiceSettings):
    """Settings of the worker service (gRPC port 50052 unless ``OPSC_GRPC_PORT`` is set)."""

    service_name: str = "worker"
    grpc_port: int = Field(default=50052, ge=0, le=65535)
    #: Identity written to executions this worker runs; default ``<hostname>:<pid>``.
    worker_id: str | None = Field(default=None, max_length=100)
    db_pool_size: int = Field(default=20, ge=1)
    #: Approval policy YAML (same file as the api's); its ``approval_ttl_s`` bounds how long a
    #: level-3 execution waits for a step approval. None: built-in.
    approval_policy_file: Path | None = None
    #: Background jobs run at once by this worker (0: do not consume the queue).
    consumer_concurrency: int = Field(default=4, ge=0, le=256)
    #: Idle poll interval of the queue consumer, in seconds.
    consumer_poll_interval_s: float = Field(default=0.1, gt=0)
    #: For drills and tests only: lease background jobs for this many seconds instead of the
    #: policy's ``step_timeout + buffer`` (e.g. 3 s, so a killed or paused worker's job is taken
    #: over within seconds). Renewals still stop at the policy's ``max_lease_renewals``, so a
    #: lease shorter than the policy's cannot cover a long job: never set it in production.
    lease_s_override: float | None = Field(default=None, gt=0)
    #: The reaper fails a ``running`` execution this many seconds after its deadline (a live
    #: worker enforces the deadline itself; one this late is gone).
    reaper_deadline_grace_s: float = Field(default=30.0, ge=0)
    #: The reaper fails an immediate execution still ``pending`` without a worker this many
    #: seconds after its creation (its api died before the hand-over, which takes milliseconds).
    reaper_unstarted_grace_s: float = Field(default=30.0, ge=0)

    @model_validator(mode="after")
    def _forwarded_tokens_only_over_tls(self) -> WorkerSettings:
        self.require_tls_for_forwarded_tokens("worker")
        return self
