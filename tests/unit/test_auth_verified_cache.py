"""A token verified once is answered from memory only while verifying it again would accept it.

Every RPC carries the caller's bearer token, and a client sends the same one with every call:
`TokenVerifier.verify` remembers the tokens it accepted so their signature is not checked again
on every call. What must still hold: a remembered token expires (and a not-yet-valid one stays
refused) on time, a token whose signing key the JWKS no longer publishes is refused, and the
memory stays bounded. The clock is moved by replacing ``datetime`` where both PyJWT and the
verifier read it.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import jwt
import jwt.api_jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm
from pydantic import SecretStr

from opsconductor.common import auth
from opsconductor.common.auth import TokenVerifier
from opsconductor.common.errors import AuthenticationError
from opsconductor.common.jwks import JwksKeys

AUDIENCE = "opsconductor-execution"
HS_KEY = SecretStr("dev-key-0123456789abcdef0123456789abcdef")


def _hs(**claims: Any) -> str:
    now = datetime.now(UTC)
    body = {"sub": "alice", "tenant_id": "tenant-a", "aud": AUDIENCE, "iat": now}
    body["exp"] = now + timedelta(minutes=5)
    body.update(claims)
    body = {k: v for k, v in body.items() if v is not None}
    return jwt.encode(body, HS_KEY.get_secret_value(), algorithm="HS256")


@pytest.fixture
def decodes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The tokens jwt.decode was asked to check, in order."""
    seen: list[str] = []
    real = jwt.decode

    def counting(token: str, *args: Any, **kwargs: Any) -> Any:
        seen.append(token)
        return real(token, *args, **kwargs)

    monkeypatch.setattr(auth.jwt, "decode", counting)
    return seen


def _shift_clock(monkeypatch: pytest.MonkeyPatch, by: timedelta) -> None:
    class Shifted(datetime):
        @classmethod
        def now(cls, tz: Any = None) -> Any:
            return datetime.now(tz) + by

    monkeypatch.setattr(auth, "datetime", Shifted)
    monkeypatch.setattr(jwt.api_jwt, "datetime", Shifted)


def test_a_token_verified_once_is_not_decoded_again(decodes: list[str]) -> None:
    verifier = TokenVerifier(audience=AUDIENCE, hs256_key=HS_KEY)
    token = _hs()
    first = verifier.verify(token)
    assert verifier.verify(token) == first
    assert verifier.verify(token).actor_id == "alice"
    assert decodes == [token]
    # Another token of the same subject is checked on its own.
    other = _hs(jti="second")
    assert verifier.verify(other).token_id == "second"
    assert decodes == [token, other]


def test_a_refused_token_is_never_remembered(decodes: list[str]) -> None:
    verifier = TokenVerifier(audience=AUDIENCE, hs256_key=HS_KEY)
    header, payload, _signature = _hs().split(".")
    forged = f"{header}.{payload}.{'A' * 43}"
    for _ in range(2):
        with pytest.raises(AuthenticationError, match="bad signature"):
            verifier.verify(forged)
    assert decodes == [forged, forged]


def test_a_remembered_token_expires_on_time(
    decodes: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    verifier = TokenVerifier(audience=AUDIENCE, hs256_key=HS_KEY, leeway=timedelta(seconds=30))
    token = _hs(exp=datetime.now(UTC) + timedelta(seconds=60))
    verifier.verify(token)
    _shift_clock(monkeypatch, timedelta(seconds=80))  # past exp, within the leeway
    assert verifier.verify(token).actor_id == "alice"
    assert decodes == [token]
    _shift_clock(monkeypatch, timedelta(seconds=95))  # past exp + leeway
    with pytest.raises(AuthenticationError, match="token expired"):
        verifier.verify(token)
    with pytest.raises(AuthenticationError, match="token expired"):
        verifier.verify(token)


def test_a_remembered_token_is_refused_when_the_clock_goes_back_before_its_nbf(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    verifier = TokenVerifier(audience=AUDIENCE, hs256_key=HS_KEY, leeway=timedelta(seconds=5))
    token = _hs(nbf=datetime.now(UTC))
    verifier.verify(token)
    _shift_clock(monkeypatch, timedelta(seconds=-60))
    with pytest.raises(AuthenticationError, match="not yet valid"):
        verifier.verify(token)


def test_a_remembered_token_without_iat_still_obeys_the_lifetime_limit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    verifier = TokenVerifier(
        audience=AUDIENCE, hs256_key=HS_KEY, max_token_lifetime=timedelta(minutes=10)
    )
    token = _hs(iat=None, exp=datetime.now(UTC) + timedelta(minutes=9))
    verifier.verify(token)
    _shift_clock(monkeypatch, timedelta(minutes=-5))  # exp - now is 14 minutes now
    with pytest.raises(AuthenticationError, match="token lifetime exceeds"):
        verifier.verify(token)


async def test_a_remembered_token_is_refused_once_the_jwks_drops_its_key() -> None:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = {**json.loads(RSAAlgorithm.to_jwk(private.public_key())), "kid": "k1"}
    published: list[dict[str, Any]] = [jwk]
    jwks = JwksKeys(
        "https://idp.test/jwks.json",
        min_refresh_s=0,
        transport=httpx.MockTransport(
            lambda request: httpx.Response(200, json={"keys": list(published)})
        ),
    )
    await jwks.refresh()
    verifier = TokenVerifier(audience=AUDIENCE, jwks=jwks)
    now = datetime.now(UTC)
    claims = {"sub": "bob", "tenant_id": "tenant-b", "aud": AUDIENCE, "iat": now}
    claims["exp"] = now + timedelta(minutes=5)
    token = jwt.encode(claims, private, algorithm="RS256", headers={"kid": "k1"})
    assert (await verifier.verify_async(token)).actor_id == "bob"
    published.clear()
    await jwks.refresh()
    with pytest.raises(AuthenticationError, match="unknown signing key"):
        await verifier.verify_async(token)
    await jwks.close()


def test_the_memory_of_verified_tokens_stays_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(auth, "_VERIFIED_CACHE_SIZE", 3)
    verifier = TokenVerifier(audience=AUDIENCE, hs256_key=HS_KEY)
    for i in range(10):
        verifier.verify(_hs(jti=f"t{i}"))
        assert len(verifier._verified) <= 3
