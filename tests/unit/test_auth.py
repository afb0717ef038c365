"""Bearer JWT verification: what is accepted, what is refused, and what the refusal says."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from pydantic import SecretStr

from opsconductor.common.auth import (
    Principal,
    TokenVerifier,
    bearer_from_metadata,
    issue_token,
)
from opsconductor.common.errors import AuthenticationError

AUDIENCE = "opsconductor-execution"
ISSUER = "https://idp.example.test"
HS_KEY = SecretStr("dev-key-0123456789abcdef0123456789abcdef")
OTHER_HS_KEY = SecretStr("another-key-0123456789abcdef0123456789ab")


@dataclass(frozen=True)
class RsaPair:
    private: rsa.RSAPrivateKey
    private_pem: bytes
    public_pem: bytes


def _pair() -> RsaPair:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return RsaPair(
        private=key,
        private_pem=key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        public_pem=key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
    )


@pytest.fixture(scope="module")
def rsa_pair() -> RsaPair:
    return _pair()


@pytest.fixture(scope="module")
def other_rsa_pair() -> RsaPair:
    return _pair()


@pytest.fixture
def hs_verifier() -> TokenVerifier:
    return TokenVerifier(audience=AUDIENCE, hs256_key=HS_KEY)


@pytest.fixture
def rs_verifier(rsa_pair: RsaPair) -> TokenVerifier:
    return TokenVerifier(audience=AUDIENCE, rs256_public_key=rsa_pair.public_pem)


@pytest.fixture
def dual_verifier(rsa_pair: RsaPair) -> TokenVerifier:
    return TokenVerifier(
        audience=AUDIENCE, hs256_key=HS_KEY, rs256_public_key=rsa_pair.public_pem.decode()
    )


def _claims(**overrides: Any) -> dict[str, Any]:
    now = datetime.now(UTC)
    claims: dict[str, Any] = {
        "sub": "alice",
        "tenant_id": "tenant-a",
        "aud": AUDIENCE,
        "iat": now,
        "exp": now + timedelta(minutes=5),
    }
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


def _hs(claims: dict[str, Any], key: SecretStr = HS_KEY) -> str:
    return jwt.encode(claims, key.get_secret_value(), algorithm="HS256")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _forge_hs256(claims: dict[str, Any], secret: bytes) -> str:
    """Sign by hand: PyJWT itself refuses a PEM as an HMAC secret, an attacker would not."""
    header = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    payload = _b64(json.dumps(claims, default=lambda d: int(d.timestamp())).encode())
    signing_input = f"{header}.{payload}".encode()
    signature = _b64(hmac.new(secret, signing_input, hashlib.sha256).digest())
    return f"{header}.{payload}.{signature}"


def _refusal(verifier: TokenVerifier, token: str) -> AuthenticationError:
    with pytest.raises(AuthenticationError) as info:
        verifier.verify(token)
    return info.value


# --- accepted tokens -----------------------------------------------------------------------


def test_hs256_token_yields_its_principal(hs_verifier: TokenVerifier) -> None:
    token = issue_token(
        actor_id="alice",
        tenant_id="tenant-a",
        audience=AUDIENCE,
        hs256_key=HS_KEY,
        auth_method="oidc",
        token_id="jti-1",
    )
    assert hs_verifier.verify(token) == Principal(
        actor_id="alice", tenant_id="tenant-a", auth_method="oidc", token_id="jti-1"
    )


def test_rs256_token_verifies_against_the_public_key(
    rs_verifier: TokenVerifier, rsa_pair: RsaPair
) -> None:
    for private in (rsa_pair.private, rsa_pair.private_pem, rsa_pair.private_pem.decode()):
        token = issue_token(
            actor_id="bob", tenant_id="tenant-b", audience=AUDIENCE, rs256_private_key=private
        )
        principal = rs_verifier.verify(token)
        assert (principal.actor_id, principal.tenant_id) == ("bob", "tenant-b")
        assert principal.auth_method == "jwt"
        assert principal.token_id is None


def test_verifier_with_both_keys_accepts_both_algorithms(
    dual_verifier: TokenVerifier, rsa_pair: RsaPair
) -> None:
    hs = issue_token(actor_id="a", tenant_id="t", audience=AUDIENCE, hs256_key=HS_KEY)
    rs = issue_token(
        actor_id="b", tenant_id="t", audience=AUDIENCE, rs256_private_key=rsa_pair.private
    )
    assert dual_verifier.verify(hs).actor_id == "a"
    assert dual_verifier.verify(rs).actor_id == "b"
    assert dual_verifier.algorithms == ("HS256", "RS256")


def test_configured_issuer_is_accepted_when_it_matches() -> None:
    verifier = TokenVerifier(audience=AUDIENCE, hs256_key=HS_KEY, issuer=ISSUER)
    token = issue_token(
        actor_id="a", tenant_id="t", audience=AUDIENCE, hs256_key=HS_KEY, issuer=ISSUER
    )
    assert verifier.verify(token).actor_id == "a"


def test_clock_skew_within_leeway_is_tolerated(hs_verifier: TokenVerifier) -> None:
    """A token that expired 10 s ago still passes with the default 30 s leeway."""
    token = issue_token(
        actor_id="a",
        tenant_id="t",
        audience=AUDIENCE,
        hs256_key=HS_KEY,
        ttl=timedelta(minutes=1),
        now=datetime.now(UTC) - timedelta(seconds=70),
    )
    assert hs_verifier.verify(token).actor_id == "a"


# --- refused tokens ------------------------------------------------------------------------


def test_expired_token_is_refused(hs_verifier: TokenVerifier) -> None:
    token = issue_token(
        actor_id="a",
        tenant_id="t",
        audience=AUDIENCE,
        hs256_key=HS_KEY,
        now=datetime.now(UTC) - timedelta(hours=1),
    )
    assert "token expired" in str(_refusal(hs_verifier, token))


def test_token_not_yet_valid_is_refused(hs_verifier: TokenVerifier) -> None:
    token = issue_token(
        actor_id="a",
        tenant_id="t",
        audience=AUDIENCE,
        hs256_key=HS_KEY,
        now=datetime.now(UTC) + timedelta(hours=1),
    )
    assert "not yet valid" in str(_refusal(hs_verifier, token))


def test_token_for_another_audience_is_refused(hs_verifier: TokenVerifier) -> None:
    token = issue_token(actor_id="a", tenant_id="t", audience="other-service", hs256_key=HS_KEY)
    assert "wrong audience" in str(_refusal(hs_verifier, token))


def test_token_from_another_issuer_is_refused() -> None:
    verifier = TokenVerifier(audience=AUDIENCE, hs256_key=HS_KEY, issuer=ISSUER)
    wrong = issue_token(
        actor_id="a", tenant_id="t", audience=AUDIENCE, hs256_key=HS_KEY, issuer="https://evil"
    )
    assert "wrong issuer" in str(_refusal(verifier, wrong))
    absent = issue_token(actor_id="a", tenant_id="t", audience=AUDIENCE, hs256_key=HS_KEY)
    assert "missing claim iss" in str(_refusal(verifier, absent))


def test_token_signed_with_another_key_has_a_bad_signature(
    hs_verifier: TokenVerifier, rs_verifier: TokenVerifier, other_rsa_pair: RsaPair
) -> None:
    forged_hs = _hs(_claims(), key=OTHER_HS_KEY)
    assert "bad signature" in str(_refusal(hs_verifier, forged_hs))
    forged_rs = issue_token(
        actor_id="a", tenant_id="t", audience=AUDIENCE, rs256_private_key=other_rsa_pair.private
    )
    assert "bad signature" in str(_refusal(rs_verifier, forged_rs))


def test_tampered_claims_break_the_signature(hs_verifier: TokenVerifier) -> None:
    """Moving a genuine token to another tenant by editing its payload is detected."""
    header, _, signature = _hs(_claims()).split(".")
    payload = _b64(
        json.dumps(_claims(tenant_id="victim"), default=lambda d: int(d.timestamp())).encode()
    )
    assert "bad signature" in str(_refusal(hs_verifier, f"{header}.{payload}.{signature}"))


def test_unsigned_alg_none_token_is_refused(dual_verifier: TokenVerifier) -> None:
    token = jwt.encode(_claims(), None, algorithm="none")
    assert "algorithm not accepted" in str(_refusal(dual_verifier, token))


def test_hs256_token_keyed_with_the_rs256_public_key_is_refused(
    rs_verifier: TokenVerifier, dual_verifier: TokenVerifier, rsa_pair: RsaPair
) -> None:
    """Algorithm confusion: the public key is public, so an HMAC keyed with it proves nothing."""
    token = _forge_hs256(_claims(), rsa_pair.public_pem)
    assert "algorithm not accepted" in str(_refusal(rs_verifier, token))
    # With an HS256 key configured too, the token is checked against that secret, never the PEM.
    assert "bad signature" in str(_refusal(dual_verifier, token))


def test_token_of_an_unconfigured_algorithm_is_refused(
    hs_verifier: TokenVerifier, rsa_pair: RsaPair
) -> None:
    token = issue_token(
        actor_id="a", tenant_id="t", audience=AUDIENCE, rs256_private_key=rsa_pair.private
    )
    assert "algorithm not accepted (accepted: HS256)" in str(_refusal(hs_verifier, token))


@pytest.mark.parametrize("claim", ["exp", "aud", "sub", "tenant_id"])
def test_token_missing_a_required_claim_is_refused(hs_verifier: TokenVerifier, claim: str) -> None:
    token = _hs(_claims(**{claim: None}))
    assert str(_refusal(hs_verifier, token)) == f"missing claim {claim}"


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"tenant_id": ""}, "invalid claim tenant_id"),
        ({"tenant_id": 42}, "invalid claim tenant_id"),
        ({"tenant_id": "t" * 101}, "invalid claim tenant_id: longer than 100"),
        ({"sub": "   "}, "invalid claim sub"),
        ({"sub": "a" * 201}, "invalid claim sub: longer than 200"),
        ({"auth_method": 7}, "invalid claim auth_method"),
        ({"auth_method": ""}, "invalid claim auth_method"),
    ],
)
def test_token_with_an_invalid_claim_value_is_refused(
    hs_verifier: TokenVerifier, overrides: dict[str, Any], expected: str
) -> None:
    assert expected in str(_refusal(hs_verifier, _hs(_claims(**overrides))))


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [({"jti": 123}, "invalid claim jti"), ({"sub": 123}, "invalid claim sub")],
)
def test_claim_of_the_wrong_type_is_refused(
    hs_verifier: TokenVerifier, overrides: dict[str, Any], expected: str
) -> None:
    assert expected in str(_refusal(hs_verifier, _hs(_claims(**overrides))))


@pytest.mark.parametrize(
    "token",
    [
        "",
        "garbage",
        "a.b.c",
        "....",
        "eyJhbGciOiJIUzI1NiJ9.%%%.###",
        _b64(b"not json") + ".e30.sig",
        _b64(b'["a list"]') + ".e30.sig",
    ],
)
def test_malformed_token_is_refused(hs_verifier: TokenVerifier, token: str) -> None:
    assert isinstance(_refusal(hs_verifier, token), AuthenticationError)


def test_non_integer_expiry_is_a_malformed_token(hs_verifier: TokenVerifier) -> None:
    token = _hs(_claims(exp="tomorrow"))
    assert "malformed token" in str(_refusal(hs_verifier, token))


def test_refusals_never_contain_the_token_or_its_parts(
    hs_verifier: TokenVerifier, rs_verifier: TokenVerifier, rsa_pair: RsaPair
) -> None:
    """Whatever the failure, neither the message, the details nor a chained cause leak the token."""
    cases = [
        (hs_verifier, _hs(_claims(exp=datetime.now(UTC) - timedelta(hours=1)))),
        (hs_verifier, _hs(_claims(aud="elsewhere"))),
        (hs_verifier, _hs(_claims(), key=OTHER_HS_KEY)),
        (hs_verifier, _hs(_claims(tenant_id=None))),
        (hs_verifier, _hs(_claims(exp="x"))),
        (hs_verifier, jwt.encode(_claims(), None, algorithm="none")),
        (rs_verifier, _forge_hs256(_claims(), rsa_pair.public_pem)),
        (hs_verifier, "not-a-jwt-but-secret-looking-s3cr3t"),
    ]
    for verifier, token in cases:
        err = _refusal(verifier, token)
        rendered = f"{err} {err!r} {err.details}"
        assert token not in rendered
        for part in token.split("."):
            if len(part) >= 8:
                assert part not in rendered
        assert err.__cause__ is None
        assert err.__context__ is None or err.__suppress_context__


# --- configuration -------------------------------------------------------------------------


def test_verifier_needs_an_audience_and_a_key(rsa_pair: RsaPair) -> None:
    with pytest.raises(ValueError, match="audience"):
        TokenVerifier(audience="", hs256_key=HS_KEY)
    with pytest.raises(ValueError, match="HS256 key, an RS256 public key"):
        TokenVerifier(audience=AUDIENCE)
    with pytest.raises(ValueError, match="at least 32 bytes"):
        TokenVerifier(audience=AUDIENCE, hs256_key=SecretStr("short"))
    with pytest.raises(ValueError, match="leeway"):
        TokenVerifier(audience=AUDIENCE, hs256_key=HS_KEY, leeway=timedelta(seconds=-1))


def test_rs256_key_must_be_an_rsa_public_key(rsa_pair: RsaPair) -> None:
    with pytest.raises(ValueError, match="not a PEM public key"):
        TokenVerifier(audience=AUDIENCE, rs256_public_key="not a pem")
    with pytest.raises(ValueError, match="not a PEM public key"):
        TokenVerifier(audience=AUDIENCE, rs256_public_key=rsa_pair.private_pem)
    ec_public = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    with pytest.raises(ValueError, match="not an RSA key"):
        TokenVerifier(audience=AUDIENCE, rs256_public_key=ec_public)


def test_repr_never_shows_the_hs256_key(dual_verifier: TokenVerifier) -> None:
    text = repr(dual_verifier)
    assert HS_KEY.get_secret_value() not in text
    assert "HS256" in text
    assert AUDIENCE in text


@dataclass(frozen=True)
class _Settings:
    jwt_hs256_key: SecretStr | None
    jwt_rs256_public_key_file: Path | str | None
    jwt_audience: str
    jwt_issuer: str | None


def test_from_settings_reads_the_public_key_file(tmp_path: Path, rsa_pair: RsaPair) -> None:
    key_file = tmp_path / "jwt.pub"
    key_file.write_bytes(rsa_pair.public_pem)
    verifier = TokenVerifier.from_settings(_Settings(None, key_file, AUDIENCE, ISSUER))
    token = issue_token(
        actor_id="a",
        tenant_id="t",
        audience=AUDIENCE,
        rs256_private_key=rsa_pair.private,
        issuer=ISSUER,
    )
    assert verifier.verify(token).actor_id == "a"
    assert verifier.algorithms == ("RS256",)


def test_from_settings_with_only_an_hs256_key_and_blank_issuer() -> None:
    verifier = TokenVerifier.from_settings(_Settings(HS_KEY, None, AUDIENCE, ""))
    token = issue_token(actor_id="a", tenant_id="t", audience=AUDIENCE, hs256_key=HS_KEY)
    assert verifier.verify(token).actor_id == "a"


def test_from_settings_with_an_unreadable_key_file_names_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "absent.pem"
    with pytest.raises(ValueError, match=r"absent\.pem"):
        TokenVerifier.from_settings(_Settings(None, str(missing), AUDIENCE, None))


def test_issue_token_needs_exactly_one_key(rsa_pair: RsaPair) -> None:
    with pytest.raises(ValueError, match="exactly one"):
        issue_token(actor_id="a", tenant_id="t", audience=AUDIENCE)
    with pytest.raises(ValueError, match="exactly one"):
        issue_token(
            actor_id="a",
            tenant_id="t",
            audience=AUDIENCE,
            hs256_key=HS_KEY,
            rs256_private_key=rsa_pair.private,
        )


def test_issue_token_refuses_a_non_rsa_private_key() -> None:
    ec_private = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    with pytest.raises(ValueError, match="not an RSA key"):
        issue_token(actor_id="a", tenant_id="t", audience=AUDIENCE, rs256_private_key=ec_private)


# --- metadata ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "metadata",
    [
        [("authorization", "Bearer tok.en.x")],
        [("x-request-id", "r1"), ("Authorization", "bearer tok.en.x")],
        (("AUTHORIZATION", b"BEARER   tok.en.x  "),),
        {"authorization": "Bearer tok.en.x"},
    ],
)
def test_bearer_token_is_read_case_insensitively(metadata: Any) -> None:
    assert bearer_from_metadata(metadata) == "tok.en.x"


@pytest.mark.parametrize(
    ("metadata", "expected"),
    [
        (None, "missing authorization metadata"),
        ([], "missing authorization metadata"),
        ([("x-api-key", "k")], "missing authorization metadata"),
        ([("authorization", "Basic dXNlcjpwYXNz")], "must be 'Bearer <token>'"),
        ([("authorization", "Bearer")], "must be 'Bearer <token>'"),
        ([("authorization", "Bearer a b")], "must be 'Bearer <token>'"),
        (
            [("authorization", "Bearer a"), ("authorization", "Bearer b")],
            "more than one authorization",
        ),
    ],
)
def test_bad_authorization_metadata_is_refused(metadata: Any, expected: str) -> None:
    with pytest.raises(AuthenticationError, match=expected) as info:
        bearer_from_metadata(metadata)
    assert "dXNlcjpwYXNz" not in str(info.value)
