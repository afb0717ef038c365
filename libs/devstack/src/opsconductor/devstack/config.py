"""Settings of ``make run`` (``python -m opsconductor.devstack``), all from ``OPSC_*`` variables.

=============================  =========================  =========================================
variable                       default                    meaning
=============================  =========================  =========================================
``DATABASE_URL``               unset → embedded Postgres  Postgres (or ``OPSC_DATABASE_URL``)
``REDIS_URL``                  unset → embedded Redis     Redis (or ``OPSC_REDIS_URL``)
``OPSC_DEVSTACK_DIR``          ``.devstack``              data folder of the embedded servers
``OPSC_DEVSTACK_HOST``         ``127.0.0.1``              interface the services listen on
``OPSC_WORKERS``               1                          worker processes (``--workers N``); the
                                                          first on ``OPSC_WORKER_PORT``, the others
                                                          on ephemeral ports
``OPSC_REAPER_INTERVAL_S``     60                         seconds between two reaper passes
``OPSC_DEVSTACK_LOG_DIR``      unset → the terminal       each service's output in ``<name>.log``
``OPSC_API_PORT``              50051                      ExecutionService + AdminService (gRPC)
``OPSC_WORKER_PORT``           50052                      WorkerService (gRPC)
``OPSC_APPROVALS_PORT``        50053                      ApprovalService (gRPC)
``OPSC_PROGRESS_PORT``         50054                      ProgressService (gRPC)
``OPSC_PROGRESS_HTTP_PORT``    8080                       progress WebSocket/SSE/long-poll and UI
``OPSC_<SVC>_METRICS_PORT``    9101 … 9104                Prometheus ``/metrics`` of each service
``OPSC_DEVSTACK_READY_S``      30                         time allowed to reach SERVING
``OPSC_DEVSTACK_STOP_GRACE_S`` 12                         SIGTERM → SIGKILL grace per service
``OPSC_LOG_JSON``              false                      services log JSON lines (else console)
=============================  =========================  =========================================

A port of 0 means an ephemeral port, chosen at start-up and kept across restarts.

Every other ``OPSC_*`` variable (log level, JWT keys, ...) passes through to the services.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

EMBEDDED_DATABASE = "opsconductor"
"""Database ``make run`` creates on the embedded Postgres."""


class DevstackSettings(BaseSettings):
    """Where the dev stack's dependencies are and which ports its services take."""

    model_config = SettingsConfigDict(env_prefix="OPSC_", frozen=True, extra="ignore")

    database_url: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("OPSC_DATABASE_URL", "DATABASE_URL")
    )
    redis_url: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("OPSC_REDIS_URL", "REDIS_URL")
    )
    devstack_dir: Path = Path(".devstack")
    devstack_host: str = "127.0.0.1"
    api_port: int = Field(default=50051, ge=0, le=65535)
    worker_port: int = Field(default=50052, ge=0, le=65535)
    approvals_port: int = Field(default=50053, ge=0, le=65535)
    progress_port: int = Field(default=50054, ge=0, le=65535)
    progress_http_port: int = Field(default=8080, ge=0, le=65535)
    api_metrics_port: int = Field(default=9101, ge=0, le=65535)
    worker_metrics_port: int = Field(default=9102, ge=0, le=65535)
    approvals_metrics_port: int = Field(default=9103, ge=0, le=65535)
    progress_metrics_port: int = Field(default=9104, ge=0, le=65535)
    workers: int = Field(default=1, ge=1, le=32)
    reaper_interval_s: float = Field(default=60.0, gt=0)
    devstack_log_dir: Path | None = None
    devstack_ready_s: float = Field(default=30.0, gt=0)
    devstack_stop_grace_s: float = Field(default=12.0, gt=0)
    # A person reads `make run` output: the console format unless JSON is asked for.
    log_json: bool = False
