"""The ``OPSC_TLS_*`` settings: what turns TLS on, what is refused at start-up, and why."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from opsconductor.api.settings import ApiSettings
from opsconductor.approvals.settings import ApprovalsSettings
from opsconductor.client import ClientTls
from opsconductor.common.settings import ServiceSettings
from opsconductor.worker.settings import WorkerSettings

DSN = "postgresql://x@h/db"
TLS = {"tls_cert_file": Path("/tls/tls.crt"), "tls_key_file": Path("/tls/tls.key")}
IDP = {"jwt_rs256_public_key_file": Path("/idp.pub"), "jwt_issuer": "https://idp"}


def _common(**fields: Any) -> ServiceSettings:
    return ServiceSettings(service_name="t", database_url=DSN, **fields)


def test_tls_is_off_by_default_as_make_run_needs() -> None:
    settings = _common()
    assert not settings.tls_enabled
    assert settings.tls_client_auth == "none"
    assert ClientTls.from_settings(settings) is None


def test_the_documented_environment_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {
        "OPSC_TLS_CERT_FILE": "/tls/tls.crt",
        "OPSC_TLS_KEY_FILE": "/tls/tls.key",
        "OPSC_TLS_CA_FILE": "/tls/ca.crt",
        "OPSC_TLS_CLIENT_AUTH": "require",
        "OPSC_TLS_SERVER_NAME": "worker.opsc.svc",
    }.items():
        monkeypatch.setenv(name, value)
    settings = _common()
    assert settings.tls_enabled
    assert settings.tls_client_auth == "require"
    assert ClientTls.from_settings(settings) == ClientTls(
        ca_file=Path("/tls/ca.crt"),
        cert_file=Path("/tls/tls.crt"),
        key_file=Path("/tls/tls.key"),
        server_name="worker.opsc.svc",
    )


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"tls_cert_file": Path("/tls/tls.crt")}, "both tls_cert_file and tls_key_file"),
        ({**TLS, "tls_client_auth": "request"}, "use none or require"),
        (
            {**TLS, "tls_client_auth": "require"},
            "needs tls_cert_file, tls_key_file and tls_ca_file",
        ),
        ({**TLS, "tls_client_auth": "sometimes"}, "tls_client_auth"),
    ],
)
def test_incomplete_or_unsupported_tls_is_refused(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError) as info:
        _common(**fields)
    assert message in str(info.value)


def test_a_production_worker_needs_tls() -> None:
    """A worker verifying IdP tokens receives forwarded user tokens: never in clear."""
    with pytest.raises(ValidationError) as info:
        WorkerSettings(database_url=DSN, **IDP)
    assert "needs TLS" in str(info.value)
    assert WorkerSettings(database_url=DSN, **IDP, **TLS).tls_enabled
    assert not WorkerSettings(database_url=DSN, **IDP, allow_insecure_dev=True).tls_enabled
    # make run: HS256 dev key, plaintext.
    assert not WorkerSettings(database_url=DSN, jwt_hs256_key="k" * 32).tls_enabled


@pytest.mark.parametrize("factory", [ApiSettings, ApprovalsSettings])
def test_production_services_forwarding_tokens_must_dial_tls(factory: Any) -> None:
    with pytest.raises(ValidationError) as info:
        factory(database_url=DSN, **IDP)
    assert "forwards user tokens to the worker" in str(info.value)
    assert factory(database_url=DSN, **IDP, tls_ca_file=Path("/tls/ca.crt")) is not None


def test_client_tls_needs_a_whole_key_pair() -> None:
    with pytest.raises(ValueError, match="both cert_file and key_file"):
        ClientTls(cert_file="/tls/tls.crt")
