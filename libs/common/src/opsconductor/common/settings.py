"""Service settings, read from the environment once in each service's ``__main__``.

Only settings classes read ``os.environ``. Each service subclasses `ServiceSettings` (adding its
own fields and a default ``service_name``), builds it once, and passes it down. Settings are
frozen; DSNs and keys are `pydantic.SecretStr`, so neither ``repr()``, ``str()``,
``model_dump()`` nor ``model_dump_json()`` shows them, and validation errors name the field
without echoing any input (``hide_input_in_errors``). Log DSNs at start-up with `redacted_dsn`
or `ServiceSettings.startup_log_fields`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from opsconductor.common.masking import REDACTED, mask_text

__all__ = ["ENV_PREFIX", "ServiceSettings", "redacted_dsn"]

ENV_PREFIX = "OPSC_"

_LOG_LEVELS = frozenset({"CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG"})


class ServiceSettings(BaseSettings):
    """Settings every OpsConductor service shares.

    Each field is read from the environment variable ``OPSC_<FIELD NAME>`` (case-insensitive),
    e.g. ``OPSC_GRPC_PORT=50051``; ``database_url`` and ``redis_url`` also accept the
    conventional unprefixed ``DATABASE_URL`` / ``REDIS_URL`` (the ``OPSC_`` name wins when both
    are set). Keyword arguments override the environment. Unknown ``OPSC_*`` variables are
    ignored.

    Fields:
        service_name: name put on every log line and metric (``api``, ``worker``...).
        database_url: Postgres DSN (``postgresql://user:password@host:5432/db``). Secret.
        redis_url: Redis URL (``redis://:password@host:6379/0``); ``None`` if the service
            does not use Redis. Secret.
        grpc_host: interface the gRPC server binds to.
        grpc_port: gRPC port; ``0`` picks a free port (tests, ``make run``).
        metrics_port: Prometheus ``/metrics`` port; ``None`` disables the endpoint.
        log_level: ``DEBUG``, ``INFO``, ``WARNING``, ``ERROR`` or ``CRITICAL``
            (any case accepted, stored upper-case).
        log_json: one JSON object per log line (production); ``false`` for console output.
        shutdown_grace_s: seconds in-flight RPCs get to finish after SIGTERM.
        jwt_hs256_key: shared HS256 key for bearer JWTs (development). Secret.
        jwt_rs256_public_key_file: PEM file with the RS256 public key (production).
        jwt_audience: required ``aud`` claim.
        jwt_issuer: required ``iss`` claim; ``None`` accepts any issuer.
        rbac_policy_file: YAML roles -> permissions policy; ``None`` uses the built-in one.
        tenant_policy_file: YAML per-tenant policy (shell sandbox, egress, quotas);
            ``None`` uses the built-in, most restrictive one.
        worker_target: gRPC address (``host:port``) of the worker, used by the api.
        queue_prefix: prefix of every Redis key of the queue (``{prefix}q:v1:...``).
        dedup_window_s: how long an idempotency key deduplicates submissions, in seconds.
        otel_exporter: OpenTelemetry trace exporter, e.g. ``none`` (default), ``console``,
            ``otlp``; interpreted by the tracing set-up (`otel_enabled` is false for ``none``).
        port_file: where the gRPC server writes the port it bound (useful with
            ``grpc_port=0``: supervisors and end-to-end tests read it); ``None`` writes none.
    """

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        frozen=True,
        extra="ignore",
        hide_input_in_errors=True,
        validate_by_name=True,
        validate_by_alias=True,
        validate_default=True,
    )

    service_name: str = Field(min_length=1)
    database_url: SecretStr = Field(
        validation_alias=AliasChoices(f"{ENV_PREFIX}DATABASE_URL", "DATABASE_URL")
    )
    redis_url: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices(f"{ENV_PREFIX}REDIS_URL", "REDIS_URL")
    )
    grpc_host: str = "127.0.0.1"
    grpc_port: int = Field(default=0, ge=0, le=65535)
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    log_level: str = "INFO"
    log_json: bool = True
    shutdown_grace_s: float = Field(default=10.0, ge=0)
    jwt_hs256_key: SecretStr | None = None
    jwt_rs256_public_key_file: Path | None = None
    jwt_audience: str = "opsconductor-execution"
    jwt_issuer: str | None = None
    rbac_policy_file: Path | None = None
    tenant_policy_file: Path | None = None
    worker_target: str = "127.0.0.1:50052"
    queue_prefix: str = Field(default="opsc:", min_length=1, max_length=64)
    dedup_window_s: int = Field(default=86400, gt=0)
    otel_exporter: str = "none"
    port_file: Path | None = None

    @property
    def otel_enabled(self) -> bool:
        """Whether tracing is on (``otel_exporter`` other than ``none``)."""
        return self.otel_exporter.strip().lower() != "none"

    @field_validator("log_level")
    @classmethod
    def _known_log_level(cls, value: str) -> str:
        level = value.upper()
        if level not in _LOG_LEVELS:
            raise ValueError(f"must be one of {', '.join(sorted(_LOG_LEVELS))}")
        return level

    def startup_log_fields(self) -> dict[str, Any]:
        """The settings as log fields for the start-up line: DSNs redacted, keys omitted."""
        fields: dict[str, Any] = {}
        for name, value in self:
            if isinstance(value, SecretStr):
                if name.endswith("_url"):
                    fields[name] = redacted_dsn(value)
                continue  # keys: presence is all a log reader needs
            fields[name] = str(value) if isinstance(value, Path) else value
        fields["jwt_hs256_key_set"] = self.jwt_hs256_key is not None
        return fields


def redacted_dsn(url: str | SecretStr | None) -> str:
    """``url`` safe to log: the password (in the authority or the query) is replaced.

    ``postgresql://app:pw@db:5432/opsc?sslmode=require`` ->
    ``postgresql://app:***REDACTED***@db:5432/opsc?sslmode=require``.
    """
    if url is None:
        return ""
    raw = url.get_secret_value() if isinstance(url, SecretStr) else url
    try:
        parts = urlsplit(raw)
        has_password = parts.password is not None
    except ValueError:  # not parseable as a URL (e.g. a bad port): fall back to text masking
        return mask_text(raw)
    if has_password:
        userinfo, _, hostinfo = parts.netloc.rpartition("@")
        user = userinfo.partition(":")[0]
        raw = urlunsplit(parts._replace(netloc=f"{user}:{REDACTED}@{hostinfo}"))
    # Query parameters such as ?password=... and libpq "key=value" DSNs.
    return mask_text(raw)
