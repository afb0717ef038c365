"""JWT hardening, written as the attacks of issue 8 finding 11: each token here was accepted before.

A string ``exp``, a ten-year token, a token whose only lifetime bound is a far ``exp`` without
``iat``, and (in production settings) a verifier without an issuer.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jwt
import pytest
from pydantic import SecretStr, ValidationError

from opsconductor.common.auth import DEFAULT_MAX_TOKEN_LIFETIME, TokenVerifier, issue_token
from opsconductor.common.errors import AuthenticationError
from opsconductor.common.settings import ServiceSettings

AUDIENCE = "opsconductor-execution"
HS_KEY = SecretStr("dev-key-0123456789abcdef0123456789abcdef")


def _token(**claims: Any) -> str:
    now = int(datetime.now(UTC).timestamp())
    body: dict[str, Any] = {
        "sub": "mallory",
        "tenant_id": "tenant-a",
        "aud": AUDIENCE,
        "iat": now,
        "exp": now + 300,
    }
    body.update(claims)
    return jwt.encode(
        {k: v for k, v in body.items() if v is not None},
        HS_KEY.get_secret_value(),
        algorithm="HS256",
    )


def _refusal(verifier: TokenVerifier, token: str) -> str:
    with pytest.raises(AuthenticationError) as info:
        verifier.verify(token)
    return str(info.value)


@pytest.fixture
def verifier() -> TokenVerifier:
    return TokenVerifier(audience=AUDIENCE, hs256_key=HS_KEY)


def test_a_string_exp_is_refused(verifier: TokenVerifier) -> None:
    """PyJWT turns ``"exp": "9999999999"`` into a number; a JWT NumericDate must be a number."""
    now = int(datetime.now(UTC).timestamp())
    reason = _refusal(verifier, _token(exp=str(now + 300)))
    assert "exp" in reason
    assert "number" in reason


@pytest.mark.parametrize("claim", ["iat", "nbf"])
def test_string_iat_and_nbf_are_refused(verifier: TokenVerifier, claim: str) -> None:
    now = int(datetime.now(UTC).timestamp())
    assert claim in _refusal(verifier, _token(**{claim: str(now)}))


def test_a_ten_year_token_is_refused(verifier: TokenVerifier) -> None:
    token = issue_token(
        actor_id="mallory",
        tenant_id="tenant-a",
        audience=AUDIENCE,
        hs256_key=HS_KEY,
        ttl=timedelta(days=3650),
    )
    reason = _refusal(verifier, token)
    assert "lifetime" in reason
    assert "12 h" in reason


def test_a_far_exp_without_iat_is_measured_from_now(verifier: TokenVerifier) -> None:
    now = int(datetime.now(UTC).timestamp())
    assert "lifetime" in _refusal(verifier, _token(iat=None, exp=now + 13 * 3600))
    # Within the bound, no iat is fine (some IdPs omit it).
    assert verifier.verify(_token(iat=None, exp=now + 3600)).actor_id == "mallory"


def test_an_old_iat_cannot_stretch_a_token_past_the_bound(verifier: TokenVerifier) -> None:
    """exp − iat is what counts: an iat long ago with an exp soon is still a long-lived token."""
    now = int(datetime.now(UTC).timestamp())
    assert "lifetime" in _refusal(verifier, _token(iat=now - 20 * 3600, exp=now + 60))


def test_the_dev_token_of_make_run_fits_the_default_bound(verifier: TokenVerifier) -> None:
    """``make run`` prints a 12 h token: the default bound must accept it."""
    assert timedelta(hours=12) == DEFAULT_MAX_TOKEN_LIFETIME
    token = issue_token(
        actor_id="dev",
        tenant_id="dev",
        audience=AUDIENCE,
        hs256_key=HS_KEY,
        ttl=timedelta(hours=12),
    )
    assert verifier.verify(token).actor_id == "dev"


def test_the_bound_is_configurable() -> None:
    short = TokenVerifier(
        audience=AUDIENCE, hs256_key=HS_KEY, max_token_lifetime=timedelta(minutes=10)
    )
    now = int(datetime.now(UTC).timestamp())
    assert "10 min" in _refusal(short, _token(exp=now + 900))
    assert short.verify(_token(exp=now + 300)).actor_id == "mallory"
    with pytest.raises(ValueError, match="lifetime"):
        TokenVerifier(audience=AUDIENCE, hs256_key=HS_KEY, max_token_lifetime=timedelta(0))


def test_settings_carry_the_lifetime_bound_to_the_verifier() -> None:
    settings = ServiceSettings(
        service_name="t",
        database_url="postgresql://x@h/db",
        jwt_hs256_key=HS_KEY,
        jwt_max_token_lifetime_s=600,
    )
    verifier = TokenVerifier.from_settings(settings)
    now = int(datetime.now(UTC).timestamp())
    assert "lifetime" in _refusal(verifier, _token(exp=now + 900))


# --- the issuer in production settings --------------------------------------------------------


def _settings(**fields: Any) -> ServiceSettings:
    return ServiceSettings(service_name="t", database_url="postgresql://x@h/db", **fields)


def test_rs256_without_an_issuer_refuses_to_start(tmp_path: Path) -> None:
    """An RS256 key means tokens from an IdP: any issuer the key signs for must not do."""
    with pytest.raises(ValidationError) as info:
        _settings(jwt_rs256_public_key_file=tmp_path / "jwt.pub")
    assert "jwt_issuer is required" in str(info.value)


def test_jwks_without_an_issuer_refuses_to_start() -> None:
    with pytest.raises(ValidationError) as info:
        _settings(jwt_jwks_url="https://idp.example.test/jwks.json")
    assert "jwt_issuer is required" in str(info.value)


def test_the_dev_flag_allows_rs256_without_an_issuer(tmp_path: Path) -> None:
    settings = _settings(jwt_rs256_public_key_file=tmp_path / "jwt.pub", allow_insecure_dev=True)
    assert settings.jwt_issuer is None


def test_hs256_without_an_issuer_still_starts() -> None:
    """``make run``: an HS256 dev key and no issuer, exactly as today."""
    assert _settings(jwt_hs256_key=HS_KEY).jwt_issuer is None


def test_a_plain_http_jwks_url_is_refused() -> None:
    """Keys fetched over plain HTTP can be replaced in transit: https only (dev flag aside)."""
    with pytest.raises(ValidationError) as info:
        _settings(jwt_jwks_url="http://idp.example.test/jwks.json", jwt_issuer="https://idp")
    assert "https" in str(info.value)
    dev = _settings(
        jwt_jwks_url="http://127.0.0.1:1/jwks.json", jwt_issuer="x", allow_insecure_dev=True
    )
    assert dev.jwt_jwks_url == "http://127.0.0.1:1/jwks.json"
