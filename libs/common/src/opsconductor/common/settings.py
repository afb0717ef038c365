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
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
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
        log_file: also append every (masked) line to this file, always as JSON, so that
            ``grep execution_started logs/app.log | jq …`` works; ``None``: stdout only.
        shutdown_grace_s: seconds in-flight RPCs get to finish after SIGTERM.
        jwt_hs256_key: shared HS256 key for bearer JWTs (development). Secret.
        jwt_rs256_public_key_file: PEM file with the RS256 public key (production).
        jwt_audience: required ``aud`` claim.
        jwt_issuer: required ``iss`` claim; ``None`` accepts any issuer — allowed only with an
            HS256 key alone (development): with an RS256 key or a JWKS URL the service refuses
            to start without an issuer unless ``allow_insecure_dev``.
        jwt_jwks_url: ``https://`` URL of the identity provider's JWKS (RS256 keys selected by
            ``kid``, cached, refreshed periodically and on an unknown ``kid``).
        jwt_jwks_refresh_s: how often the JWKS is fetched again, in seconds.
        jwt_jwks_min_refresh_s: at most one unknown-``kid`` refresh per this many seconds (random
            ``kid`` values must not make us hammer the IdP).
        jwt_max_token_lifetime_s: longest accepted token life (``exp − iat``, or ``exp − now``
            without ``iat``), in seconds; default 12 h, the life of ``make run``'s dev token.
        allow_insecure_dev: development escape hatch: RS256/JWKS without an issuer, a JWKS URL
            over plain ``http``, and a worker taking forwarded tokens without TLS. Never set it
            in production.
        tls_cert_file: PEM certificate chain (cert-manager's ``tls.crt``). With
            ``tls_key_file`` it turns TLS on for this service's gRPC server *and* for its
            clients (api → worker, approvals → worker), which present it as their client
            certificate. Unset (the default, ``make run``): plaintext. The production overlay
            turns TLS on.
        tls_key_file: PEM private key of ``tls_cert_file`` (``tls.key``).
        tls_ca_file: PEM CA bundle (``ca.crt``). Server: the CA client certificates must chain to
            (mTLS); client: the CA that signs the servers' certificates (unset: system roots).
        tls_client_auth: ``none`` (default) or ``require`` (mTLS: a client without a
            certificate signed by ``tls_ca_file`` is refused during the handshake).
            ``request`` (ask, verify if sent) is refused at start-up: grpcio cannot express it.
        tls_server_name: client side: the name expected in the server's certificate, when it
            differs from the host of the target address (e.g. dialing by IP).
        tls_reload_check_s: how often, at most, the certificate files are checked for rotation
            (server: on a new connection; clients: on a call), in seconds.
        health_port: optional plaintext port serving only ``grpc.health.v1`` (kubelet gRPC
            probes cannot speak TLS); ``None`` (default) serves health on ``grpc_port`` only.
        rbac_policy_file: YAML roles -> permissions policy; ``None`` uses the built-in one.
        tenant_policy_file: YAML per-tenant policy (shell sandbox, egress, quotas);
            ``None`` uses the built-in, most restrictive one.
        worker_target: gRPC address (``host:port``) of the worker, used by the api.
        queue_prefix: prefix of every Redis key of the queue (``{prefix}q:v2:...``).
        dedup_window_s: how long an idempotency key deduplicates submissions, in seconds.
        quota_max_queued: default per-tenant limit of background jobs waiting in the queue
            (ready or in backoff); a submit beyond it is refused ``RESOURCE_EXHAUSTED``.
            0: no limit. A tenant's ``quotas`` in the tenant policy overrides each default.
        quota_max_running: default per-tenant limit of background jobs running (leased) at
            once; the queue passes a tenant at its limit over. Keep it below the fleet's
            consumer slots so another tenant always finds one. 0: no limit.
        quota_max_immediate: default per-tenant limit of immediate executions in flight; a
            submit beyond it is refused ``RESOURCE_EXHAUSTED``. 0: no limit.
        quota_retry_after_s: the retry delay a refused background submit is told to wait
            (immediate refusals estimate it from the runs in flight).
        otel_exporter: OpenTelemetry trace exporter: ``none`` (default), ``otlp``, ``console``
            or ``file`` (:mod:`opsconductor.common.tracing`; `otel_enabled` is false for ``none``).
        otel_endpoint: the ``otlp`` exporter's collector endpoint.
        otel_file: the ``file`` exporter's output file.
        grpc_max_message_bytes: largest gRPC message served or sent (both directions);
            larger ones are refused with ``RESOURCE_EXHAUSTED`` before they are decoded.
        grpc_max_concurrent_rpcs: RPCs served at once; beyond it ``RESOURCE_EXHAUSTED``.
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
    log_file: Path | None = None
    shutdown_grace_s: float = Field(default=10.0, ge=0)
    jwt_hs256_key: SecretStr | None = None
    jwt_rs256_public_key_file: Path | None = None
    jwt_audience: str = "opsconductor-execution"
    jwt_issuer: str | None = None
    jwt_jwks_url: str | None = None
    jwt_jwks_refresh_s: float = Field(default=300.0, gt=0)
    jwt_jwks_min_refresh_s: float = Field(default=30.0, ge=0)
    jwt_max_token_lifetime_s: int = Field(default=12 * 3600, gt=0)
    allow_insecure_dev: bool = False
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_ca_file: Path | None = None
    tls_client_auth: Literal["none", "request", "require"] = "none"
    tls_server_name: str | None = None
    tls_reload_check_s: float = Field(default=10.0, ge=0)
    health_port: int | None = Field(default=None, ge=0, le=65535)
    rbac_policy_file: Path | None = None
    tenant_policy_file: Path | None = None
    worker_target: str = "127.0.0.1:50052"
    queue_prefix: str = Field(default="opsc:", min_length=1, max_length=64)
    dedup_window_s: int = Field(default=86400, gt=0)
    quota_max_queued: int = Field(default=500, ge=0)
    quota_max_running: int = Field(default=10, ge=0)
    quota_max_immediate: int = Field(default=20, ge=0)
    quota_retry_after_s: float = Field(default=5.0, gt=0, le=3600)
    otel_exporter: str = "none"
    #: OTLP/gRPC endpoint of the ``otlp`` exporter (e.g. ``http://otel-collector:4317``).
    otel_endpoint: str | None = None
    #: Where the ``file`` exporter appends its spans (one JSON object a line).
    otel_file: Path | None = None
    grpc_max_message_bytes: int = Field(default=4 * 1024 * 1024, ge=64 * 1024)
    grpc_max_concurrent_rpcs: int = Field(default=256, ge=1)
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

    @model_validator(mode="after")
    def _production_auth_and_tls(self) -> ServiceSettings:
        """Refuse configurations that would silently weaken authentication or transport."""
        idp_keys = self.jwt_rs256_public_key_file is not None or bool(self.jwt_jwks_url)
        if idp_keys and not self.jwt_issuer and not self.allow_insecure_dev:
            raise ValueError(
                "jwt_issuer is required with an RS256 key or a JWKS URL (set OPSC_JWT_ISSUER)"
            )
        if (
            self.jwt_jwks_url
            and not self.jwt_jwks_url.startswith("https://")
            and not self.allow_insecure_dev
        ):
            raise ValueError("jwt_jwks_url must be an https:// URL")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("set both tls_cert_file and tls_key_file, or neither")
        if self.tls_client_auth == "request":
            raise ValueError(
                "tls_client_auth=request is not supported (grpcio can only not ask for client "
                "certificates or require and verify them): use none or require"
            )
        if self.tls_client_auth == "require" and (
            self.tls_cert_file is None or self.tls_ca_file is None
        ):
            raise ValueError(
                "tls_client_auth=require needs tls_cert_file, tls_key_file and tls_ca_file"
            )
        return self

    @property
    def tls_enabled(self) -> bool:
        """Whether this service serves (and dials) TLS."""
        return self.tls_cert_file is not None

    @property
    def idp_keys_configured(self) -> bool:
        """Tokens come from an identity provider (RS256 key or JWKS): the production profile."""
        return self.jwt_rs256_public_key_file is not None or bool(self.jwt_jwks_url)

    def require_tls_for_forwarded_tokens(self, side: str) -> None:
        """Refuse (``ValueError``) to carry user tokens to or from the worker in clear.

        With identity-provider keys (production) the worker must serve TLS and the services
        that forward tokens to it must dial TLS; ``allow_insecure_dev`` waives it. ``side`` says
        which, for the message.
        """
        if not self.idp_keys_configured or self.allow_insecure_dev:
            return
        if side == "worker" and not self.tls_enabled:
            raise ValueError(
                "the worker receives forwarded user tokens: with an RS256 key or a JWKS URL it "
                "needs TLS (set OPSC_TLS_CERT_FILE and OPSC_TLS_KEY_FILE, and "
                "OPSC_TLS_CLIENT_AUTH=require with OPSC_TLS_CA_FILE for mTLS)"
            )
        if side == "client" and self.tls_cert_file is None and self.tls_ca_file is None:
            raise ValueError(
                f"the {self.service_name} service forwards user tokens to the worker: with an "
                "RS256 key or a JWKS URL it must dial it over TLS (set OPSC_TLS_CA_FILE, and "
                "OPSC_TLS_CERT_FILE/OPSC_TLS_KEY_FILE for mTLS)"
            )

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
