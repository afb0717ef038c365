"""ServiceSettings: environment names, defaults, validation, and never printing a secret."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import SecretStr, ValidationError

from opsconductor.common.masking import REDACTED
from opsconductor.common.settings import ENV_PREFIX, ServiceSettings, redacted_dsn

DSN = "postgresql://opsc:Db-P4ssw0rd!@db.internal:5432/opsc?sslmode=require"
REDIS = "redis://:R3dis-Pw@cache:6379/0"
HS256 = "hs256-signing-key-0123456789"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts from an environment without OPSC_*, DATABASE_URL or REDIS_URL."""
    for name in list(os.environ):
        if name.upper().startswith(ENV_PREFIX) or name.upper() in {"DATABASE_URL", "REDIS_URL"}:
            monkeypatch.delenv(name)


def _settings(**kwargs: object) -> ServiceSettings:
    values: dict[str, object] = {"service_name": "api", "database_url": DSN} | kwargs
    return ServiceSettings(**values)  # type: ignore[arg-type]


def test_defaults_match_the_documented_values() -> None:
    settings = _settings()
    assert settings.grpc_host == "127.0.0.1"
    assert settings.grpc_port == 0
    assert settings.metrics_port is None
    assert settings.log_level == "INFO"
    assert settings.log_json is True
    assert settings.shutdown_grace_s == 10.0
    assert settings.redis_url is None
    assert settings.jwt_hs256_key is None
    assert settings.jwt_rs256_public_key_file is None
    assert settings.jwt_audience == "opsconductor-execution"
    assert settings.jwt_issuer is None
    assert settings.rbac_policy_file is None
    assert settings.worker_target == "127.0.0.1:50052"
    assert settings.dedup_window_s == 86400
    assert settings.otel_exporter == "none"
    assert settings.otel_enabled is False
    assert settings.port_file is None


def test_every_field_is_read_from_its_opsc_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {
        "OPSC_SERVICE_NAME": "worker",
        "OPSC_DATABASE_URL": DSN,
        "OPSC_REDIS_URL": REDIS,
        "OPSC_GRPC_HOST": "0.0.0.0",
        "OPSC_GRPC_PORT": "50052",
        "OPSC_METRICS_PORT": "9102",
        "opsc_log_level": "debug",
        "OPSC_LOG_JSON": "false",
        "OPSC_SHUTDOWN_GRACE_S": "2.5",
        "OPSC_JWT_HS256_KEY": HS256,
        "OPSC_JWT_RS256_PUBLIC_KEY_FILE": "/etc/opsc/jwt.pub",
        "OPSC_JWT_AUDIENCE": "aud-x",
        "OPSC_JWT_ISSUER": "https://issuer",
        "OPSC_RBAC_POLICY_FILE": "/etc/opsc/rbac.yaml",
        "OPSC_WORKER_TARGET": "worker:50052",
        "OPSC_DEDUP_WINDOW_S": "60",
        "OPSC_OTEL_EXPORTER": "otlp",
        "OPSC_PORT_FILE": "/run/opsc/worker.port",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = ServiceSettings()
    assert settings.service_name == "worker"
    assert settings.database_url.get_secret_value() == DSN
    assert settings.redis_url is not None
    assert settings.redis_url.get_secret_value() == REDIS
    assert (settings.grpc_host, settings.grpc_port, settings.metrics_port) == (
        "0.0.0.0",
        50052,
        9102,
    )
    assert settings.log_level == "DEBUG"
    assert settings.log_json is False
    assert settings.shutdown_grace_s == 2.5
    assert settings.jwt_hs256_key is not None
    assert settings.jwt_hs256_key.get_secret_value() == HS256
    assert settings.jwt_rs256_public_key_file == Path("/etc/opsc/jwt.pub")
    assert (settings.jwt_audience, settings.jwt_issuer) == ("aud-x", "https://issuer")
    assert settings.rbac_policy_file == Path("/etc/opsc/rbac.yaml")
    assert settings.worker_target == "worker:50052"
    assert settings.dedup_window_s == 60
    assert settings.otel_enabled is True
    assert settings.port_file == Path("/run/opsc/worker.port")


def test_plain_database_and_redis_urls_are_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPSC_SERVICE_NAME", "api")
    monkeypatch.setenv("DATABASE_URL", DSN)
    monkeypatch.setenv("REDIS_URL", REDIS)
    settings = ServiceSettings()
    assert settings.database_url.get_secret_value() == DSN
    assert settings.redis_url is not None
    assert settings.redis_url.get_secret_value() == REDIS


def test_prefixed_url_wins_over_the_plain_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPSC_SERVICE_NAME", "api")
    monkeypatch.setenv("DATABASE_URL", "postgresql://plain@h/db")
    monkeypatch.setenv("OPSC_DATABASE_URL", DSN)
    assert ServiceSettings().database_url.get_secret_value() == DSN


def test_keyword_arguments_override_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPSC_GRPC_PORT", "1234")
    monkeypatch.setenv("DATABASE_URL", "postgresql://env@h/db")
    settings = _settings(grpc_port=4321)
    assert settings.grpc_port == 4321
    assert settings.database_url.get_secret_value() == DSN


def test_service_subclass_supplies_its_own_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    class WorkerSettings(ServiceSettings):
        service_name: str = "worker"
        grpc_port: int = 50052

    monkeypatch.setenv("DATABASE_URL", DSN)
    settings = WorkerSettings()
    assert (settings.service_name, settings.grpc_port) == ("worker", 50052)


def test_settings_are_frozen() -> None:
    settings = _settings()
    with pytest.raises(ValidationError, match="frozen"):
        settings.grpc_port = 1  # type: ignore[misc]


def test_repr_str_and_dumps_never_show_a_secret() -> None:
    settings = _settings(redis_url=REDIS, jwt_hs256_key=HS256)
    rendered = [
        repr(settings),
        str(settings),
        settings.model_dump_json(),
        str(settings.model_dump()),
    ]
    for text in rendered:
        for secret in ("Db-P4ssw0rd!", "R3dis-Pw", HS256):
            assert secret not in text


@pytest.mark.parametrize(
    ("env", "field"),
    [
        ({"OPSC_GRPC_PORT": "Db-P4ssw0rd!"}, "grpc_port"),
        ({"OPSC_GRPC_PORT": "70000"}, "grpc_port"),
        ({"OPSC_METRICS_PORT": "-1"}, "metrics_port"),
        ({"OPSC_LOG_LEVEL": "chatty"}, "log_level"),
        ({"OPSC_DEDUP_WINDOW_S": "0"}, "dedup_window_s"),
        ({"OPSC_SHUTDOWN_GRACE_S": "-1"}, "shutdown_grace_s"),
        ({"OPSC_SERVICE_NAME": ""}, "service_name"),
    ],
)
def test_validation_errors_name_the_field_without_echoing_input(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], field: str
) -> None:
    monkeypatch.setenv("OPSC_SERVICE_NAME", "api")
    monkeypatch.setenv("DATABASE_URL", DSN)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError) as caught:
        ServiceSettings()
    text = str(caught.value)
    assert field in text
    assert "Db-P4ssw0rd!" not in text
    assert "input_value" not in text


def test_missing_field_error_does_not_echo_the_other_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """pydantic's "missing" error would otherwise print the whole input, DSN included."""
    monkeypatch.setenv("DATABASE_URL", DSN)
    monkeypatch.setenv("OPSC_JWT_HS256_KEY", HS256)
    with pytest.raises(ValidationError) as caught:
        ServiceSettings()
    text = f"{caught.value}\n{caught.value!r}"
    assert "service_name" in text
    assert "Db-P4ssw0rd!" not in text
    assert HS256 not in text


def test_database_url_is_required() -> None:
    with pytest.raises(ValidationError, match=r"database_url|DATABASE_URL"):
        ServiceSettings(service_name="api")


def test_startup_log_fields_redact_dsns_and_omit_keys() -> None:
    settings = _settings(
        redis_url=REDIS, jwt_hs256_key=HS256, rbac_policy_file=Path("/etc/rbac.yaml")
    )
    fields = settings.startup_log_fields()
    assert fields["database_url"] == (
        f"postgresql://opsc:{REDACTED}@db.internal:5432/opsc?sslmode=require"
    )
    assert fields["redis_url"] == f"redis://:{REDACTED}@cache:6379/0"
    assert "jwt_hs256_key" not in fields
    assert fields["jwt_hs256_key_set"] is True
    assert fields["rbac_policy_file"] == "/etc/rbac.yaml"
    assert fields["grpc_port"] == 0
    assert HS256 not in str(fields)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (DSN, f"postgresql://opsc:{REDACTED}@db.internal:5432/opsc?sslmode=require"),
        (SecretStr(REDIS), f"redis://:{REDACTED}@cache:6379/0"),
        ("postgresql://u:p@ss:w@rd@h/db", f"postgresql://u:{REDACTED}@h/db"),
        ("postgresql://nopassword@h:5432/db", "postgresql://nopassword@h:5432/db"),
        (
            "postgresql:///db?host=/tmp&password=qs-pw",
            f"postgresql:///db?host=/tmp&password={REDACTED}",
        ),
        (
            "host=db user=app password=kw-pw dbname=x",
            f"host=db user=app password={REDACTED} dbname=x",
        ),
        ("postgresql://u:bad-ipv6-pw@[::1/db", f"postgresql://u:{REDACTED}@[::1/db"),
        (None, ""),
    ],
)
def test_redacted_dsn_hides_the_password(url: str | SecretStr | None, expected: str) -> None:
    assert redacted_dsn(url) == expected
