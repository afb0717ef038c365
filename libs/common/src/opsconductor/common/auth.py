"""Authentication: bearer JWTs in gRPC metadata → a verified :class:`Principal`.

Who may call is decided here; what they may do is :mod:`opsconductor.policy.rbac`'s job. A token
carries the actor (``sub``), the tenant (``tenant_id``) and how the actor authenticated
(``auth_method``, default ``"jwt"``). Roles are never read from the token: they live in Postgres.

Keys and algorithms (RFC 8725 §2.1, §3.1):

- an HS256 shared secret (development, tests) verifies only ``alg: HS256`` tokens;
- an RS256 public key (production: the IdP's signing key, PEM) verifies only ``alg: RS256``.

The algorithm is pinned by the *key*, never taken from the token: a token's ``alg`` header only
selects which configured key to try, and a key is only ever used with its own algorithm. So
``alg: none`` is refused, and an HS256 token "signed" with the RS256 public key PEM as an HMAC
secret (algorithm confusion) can never verify. Audience and expiry are mandatory; the issuer is
checked when configured (production settings require one: ``ServiceSettings``).

Time claims (RFC 7519 §2, §4.1.4): ``exp``, ``iat`` and ``nbf`` must be JSON numbers — PyJWT
itself would turn ``"exp": "9999999999"`` into a number. A token may live at most
``max_token_lifetime`` (default 12 h, the life of ``make run``'s dev token): ``exp − iat``, or
``exp − now`` when the token has no ``iat``, so neither a ten-year token nor an old ``iat``
stretches a stolen token's use.

With a JWKS (``jwks=``, :class:`opsconductor.common.jwks.JwksKeys`), an RS256 token's ``kid``
selects the identity provider's key; an unknown ``kid`` refreshes the set (rate-limited) before
the token is refused. That needs I/O, so RPCs call :meth:`TokenVerifier.verify_async`; the sync
:meth:`TokenVerifier.verify` uses the keys already known.

Error messages say what to fix ("token expired", "wrong audience") and never contain the token.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final, Protocol

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey, RSAPublicKey
from jwt.exceptions import InvalidJTIError, InvalidSubjectError
from pydantic import SecretStr

from opsconductor.common.errors import AuthenticationError
from opsconductor.common.identifiers import identity_problem
from opsconductor.common.jwks import JwksKeys

__all__ = [
    "DEFAULT_AUTH_METHOD",
    "DEFAULT_LEEWAY",
    "DEFAULT_MAX_TOKEN_LIFETIME",
    "MACHINE_AUTH_METHODS",
    "JwtSettings",
    "Principal",
    "TokenVerifier",
    "bearer_from_metadata",
    "issue_token",
]

#: ``auth_method`` of a token that does not say how its subject authenticated.
DEFAULT_AUTH_METHOD: Final = "jwt"
#: ``auth_method`` values of machine identities (schedulers, incident bots, our own services).
MACHINE_AUTH_METHODS: Final = frozenset({"service"})
#: Clock skew tolerated on ``exp``/``nbf``/``iat`` between the IdP and us.
DEFAULT_LEEWAY: Final = timedelta(seconds=30)
#: Longest ``exp − iat`` accepted unless configured otherwise (``make run`` mints 12 h tokens).
DEFAULT_MAX_TOKEN_LIFETIME: Final = timedelta(hours=12)
#: RFC 7518 §3.2: an HS256 key must be at least as long as the hash output.
MIN_HS256_KEY_BYTES: Final = 32

_HS256: Final = "HS256"
_RS256: Final = "RS256"
_REQUIRED_CLAIMS: Final = ("exp", "aud", "sub", "tenant_id")
_TIME_CLAIMS: Final = ("exp", "iat", "nbf")
# Column widths of executions.tenant_id / actor_id: a longer claim could never be stored.
_MAX_TENANT_LEN: Final = 100
_MAX_ACTOR_LEN: Final = 200
_ONE_KEY: Final = "pass exactly one of hs256_key and rs256_private_key"
_BEARER = re.compile(r"^\s*bearer\s+(\S+)\s*$", re.IGNORECASE)
#: Tokens remembered as verified (a client sends the same token with every call); when full,
#: the memory starts afresh.
_VERIFIED_CACHE_SIZE: Final = 4096


@dataclass(frozen=True, slots=True)
class _Verified:
    """What a successful verification established about one token string."""

    principal: Principal
    alg: str
    header: Mapping[str, Any]
    key: Any
    claims: Mapping[str, Any]


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: who (``actor_id``), for which tenant, and how they proved it."""

    actor_id: str
    tenant_id: str
    auth_method: str = DEFAULT_AUTH_METHOD
    token_id: str | None = None

    @property
    def is_machine(self) -> bool:
        """Whether this is automation (a service token), not a person: its cancellations are
        counted as ``system``-initiated (docs/observability.md)."""
        return self.auth_method in MACHINE_AUTH_METHODS


class JwtSettings(Protocol):
    """The settings fields :meth:`TokenVerifier.from_settings` reads (any object with them)."""

    @property
    def jwt_hs256_key(self) -> SecretStr | None: ...

    @property
    def jwt_rs256_public_key_file(self) -> Path | str | None: ...

    @property
    def jwt_audience(self) -> str: ...

    @property
    def jwt_issuer(self) -> str | None: ...

    # Also read, when present: jwt_jwks_url, jwt_jwks_refresh_s, jwt_jwks_min_refresh_s,
    # jwt_max_token_lifetime_s (older settings objects and test doubles may lack them).


def _load_rs256_public_key(pem: str | bytes) -> RSAPublicKey:
    data = pem.encode() if isinstance(pem, str) else pem
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError as exc:
        raise ValueError("jwt RS256 public key is not a PEM public key") from exc
    if not isinstance(key, RSAPublicKey):
        raise ValueError("jwt RS256 public key is not an RSA key")
    return key


class TokenVerifier:
    """Verify bearer JWTs against the configured keys and turn them into principals.

    At least one key is required. ``audience`` is mandatory: a token minted for another service
    must not work here. ``leeway`` absorbs clock skew on the time claims.
    """

    def __init__(
        self,
        *,
        audience: str,
        hs256_key: SecretStr | None = None,
        rs256_public_key: str | bytes | None = None,
        issuer: str | None = None,
        leeway: timedelta = DEFAULT_LEEWAY,
        max_token_lifetime: timedelta = DEFAULT_MAX_TOKEN_LIFETIME,
        jwks: JwksKeys | None = None,
    ) -> None:
        if not audience:
            raise ValueError("jwt audience must be configured")
        if hs256_key is None and rs256_public_key is None and jwks is None:
            raise ValueError("configure a jwt HS256 key, an RS256 public key or a JWKS URL")
        if (
            hs256_key is not None
            and len(hs256_key.get_secret_value().encode()) < MIN_HS256_KEY_BYTES
        ):
            raise ValueError(f"jwt HS256 key must be at least {MIN_HS256_KEY_BYTES} bytes")
        if leeway < timedelta(0):
            raise ValueError("jwt leeway must not be negative")
        if max_token_lifetime <= timedelta(0):
            raise ValueError("jwt max token lifetime must be positive")
        # Each key is bound to exactly one algorithm here, once, from configuration.
        self._keys: dict[str, Any] = {}
        if hs256_key is not None:
            self._keys[_HS256] = hs256_key.get_secret_value()
        if rs256_public_key is not None:
            self._keys[_RS256] = _load_rs256_public_key(rs256_public_key)
        self._audience = audience
        self._issuer = issuer
        self._leeway = leeway
        self._max_lifetime = max_token_lifetime
        self.jwks = jwks
        self._verified: dict[str, _Verified] = {}

    @classmethod
    def from_settings(cls, settings: JwtSettings) -> TokenVerifier:
        """Build a verifier from service settings (reads the RS256 public key file, if set)."""
        jwks = None
        jwks_url = getattr(settings, "jwt_jwks_url", None)
        if jwks_url:
            jwks = JwksKeys(
                jwks_url,
                refresh_s=getattr(settings, "jwt_jwks_refresh_s", 300.0),
                min_refresh_s=getattr(settings, "jwt_jwks_min_refresh_s", 30.0),
            )
        public_key: bytes | None = None
        if settings.jwt_rs256_public_key_file:
            path = Path(settings.jwt_rs256_public_key_file)
            try:
                public_key = path.read_bytes()
            except OSError as exc:
                raise ValueError(f"cannot read jwt RS256 public key file {path}") from exc
        return cls(
            audience=settings.jwt_audience,
            hs256_key=settings.jwt_hs256_key,
            rs256_public_key=public_key,
            issuer=settings.jwt_issuer or None,
            # Read leniently: older settings objects (and test doubles) may not have it.
            max_token_lifetime=timedelta(
                seconds=getattr(
                    settings,
                    "jwt_max_token_lifetime_s",
                    DEFAULT_MAX_TOKEN_LIFETIME.total_seconds(),
                )
            ),
            jwks=jwks,
        )

    @property
    def algorithms(self) -> tuple[str, ...]:
        """The algorithms this verifier accepts (one per configured key)."""
        return tuple(sorted({*self._keys, *([_RS256] if self.jwks is not None else [])}))

    def __repr__(self) -> str:
        return (
            f"TokenVerifier(algorithms={list(self.algorithms)!r}, "
            f"audience={self._audience!r}, issuer={self._issuer!r})"
        )

    async def start(self) -> None:
        """Fetch the JWKS and keep it fresh (no-op without one); call in the running loop."""
        if self.jwks is not None:
            await self.jwks.start()

    async def close(self) -> None:
        if self.jwks is not None:
            await self.jwks.close()

    async def verify_async(self, token: str) -> Principal:
        """:meth:`verify`, first fetching the JWKS again if the token names an unknown ``kid``
        (at most once per cooldown, see :mod:`opsconductor.common.jwks`)."""
        kid = self._jwks_kid(token)
        if kid is not None and self.jwks is not None and self.jwks.cached(kid) is None:
            await self.jwks.key_for(kid)
        return self.verify(token)

    def verify(self, token: str) -> Principal:
        """Return the principal of a valid token; raise :class:`AuthenticationError` otherwise.

        The error message names the problem (expired, bad signature, wrong audience, missing
        claim …) and never contains the token or any part of it.

        A token verified before is answered from memory, without decoding it or checking its
        signature again (the same bytes under the same key verify the same way), as long as
        the key that verified it is still the one its header selects (a JWKS may have dropped
        it) and its time claims still hold now; otherwise it is verified from scratch.
        """
        known = self._verified.get(token)
        if known is not None and self._still_valid(known):
            return known.principal
        header = self._header(token)
        # The header only picks which configured key to try; that key's algorithm is the only
        # one passed to PyJWT, so "none" or HS256-with-the-RSA-public-key cannot get through.
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self.algorithms:
            accepted = ", ".join(self.algorithms)
            raise AuthenticationError(f"token algorithm not accepted (accepted: {accepted})")
        key = self._key(alg, header)
        # Every failure below is re-raised `from None`: PyJWT's exceptions are not needed to act
        # on the message, and a chained traceback is one more place a token fragment could leak.
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key=key,
                algorithms=[alg],
                audience=self._audience,
                issuer=self._issuer,
                leeway=self._leeway,
                options={"require": list(_REQUIRED_CLAIMS), "strict_aud": False},
            )
        except jwt.PyJWTError as exc:
            raise AuthenticationError(self._describe(exc)) from None
        self._check_lifetime(claims)
        principal = self._principal(claims)
        if len(self._verified) >= _VERIFIED_CACHE_SIZE:
            self._verified.clear()
        self._verified[token] = _Verified(principal, alg, header, key, claims)
        return principal

    def _still_valid(self, known: _Verified) -> bool:
        """Whether ``verify`` would accept this remembered token now (same key, same times)."""
        try:
            if self._key(known.alg, known.header) is not known.key:
                return False
        except AuthenticationError:
            return False
        # PyJWT's checks (int() of each claim, leeway on both sides), then the lifetime rule.
        now = datetime.now(UTC).timestamp()
        leeway = self._leeway.total_seconds()
        claims = known.claims
        if int(claims["exp"]) <= now - leeway:
            return False
        for name in ("nbf", "iat"):
            if name in claims and int(claims[name]) > now + leeway:
                return False
        try:
            self._check_lifetime(claims)
        except AuthenticationError:
            return False
        return True

    @staticmethod
    def _header(token: str) -> dict[str, Any]:
        if not token:
            raise AuthenticationError("missing bearer token")
        try:
            return jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise AuthenticationError("malformed token: not a signed JWT") from None

    def _jwks_kid(self, token: str) -> str | None:
        """The ``kid`` of an RS256 token the JWKS should resolve (None: not a JWKS case)."""
        if self.jwks is None:
            return None
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            return None  # verify() says why
        kid = header.get("kid")
        if header.get("alg") != _RS256 or not isinstance(kid, str) or not kid:
            return None
        return kid

    def _key(self, alg: str, header: Mapping[str, Any]) -> Any:
        """The configured key for ``alg``; for RS256 with a JWKS, the key the ``kid`` names."""
        if alg != _RS256 or self.jwks is None:
            return self._keys[alg]
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            if _RS256 in self._keys:
                return self._keys[_RS256]  # the static key signs tokens without a kid
            raise AuthenticationError("token has no kid: cannot select the signing key")
        key = self.jwks.cached(kid)
        if key is None:
            raise AuthenticationError(
                "unknown signing key (kid): not published by the identity provider"
            )
        return key

    def _check_lifetime(self, claims: Mapping[str, Any]) -> None:
        """Time claims are numbers, and the token lives no longer than allowed."""
        for name in _TIME_CLAIMS:
            value = claims.get(name)
            # bool is an int to Python, and "true" is not a NumericDate.
            if name in claims and (isinstance(value, bool) or not isinstance(value, int | float)):
                raise AuthenticationError(f"invalid claim {name}: must be a number (NumericDate)")
        start = claims.get("iat")
        if start is None:
            start = datetime.now(UTC).timestamp()
        if claims["exp"] - start > self._max_lifetime.total_seconds():
            limit = _duration(self._max_lifetime)
            raise AuthenticationError(
                f"token lifetime exceeds {limit}: obtain a shorter-lived token"
            )

    def _describe(self, exc: jwt.PyJWTError) -> str:
        # Most specific first: several of these subclass DecodeError / InvalidTokenError.
        if isinstance(exc, jwt.ExpiredSignatureError):
            return "token expired: obtain a new token"
        if isinstance(exc, jwt.ImmatureSignatureError):
            return "token not yet valid: check the issuer's clock"
        if isinstance(exc, jwt.InvalidAudienceError):
            return f"wrong audience: token is not for {self._audience!r}"
        if isinstance(exc, jwt.InvalidIssuerError):
            return f"wrong issuer: expected {self._issuer!r}"
        if isinstance(exc, jwt.MissingRequiredClaimError):
            return f"missing claim {exc.claim}"
        if isinstance(exc, jwt.InvalidSignatureError):
            return "bad signature: token was not signed by a trusted key"
        if isinstance(exc, InvalidSubjectError):
            return "invalid claim sub: must be a non-empty string"
        if isinstance(exc, InvalidJTIError):
            return "invalid claim jti: must be a string"
        return "malformed token: invalid JWT structure or claim types"

    def _principal(self, claims: Mapping[str, Any]) -> Principal:
        actor_id = _string_claim(claims, "sub", _MAX_ACTOR_LEN)
        tenant_id = _string_claim(claims, "tenant_id", _MAX_TENANT_LEN)
        auth_method = claims.get("auth_method", DEFAULT_AUTH_METHOD)
        if not isinstance(auth_method, str) or not auth_method:
            raise AuthenticationError("invalid claim auth_method: must be a non-empty string")
        # Identifiers end up in keys and columns: one that cannot be stored never gets in.
        problem = identity_problem(tenant_id=tenant_id, actor_id=actor_id, auth_method=auth_method)
        if problem is not None:
            raise AuthenticationError(f"invalid claim {problem}")
        # PyJWT has already checked that a present "jti" is a string.
        return Principal(
            actor_id=actor_id,
            tenant_id=tenant_id,
            auth_method=auth_method,
            token_id=claims.get("jti"),
        )


def _duration(span: timedelta) -> str:
    seconds = int(span.total_seconds())
    for unit, size in (("h", 3600), ("min", 60)):
        if seconds % size == 0:
            return f"{seconds // size} {unit}"
    return f"{seconds} s"


def _string_claim(claims: Mapping[str, Any], name: str, max_len: int) -> str:
    value = claims.get(name)
    if not isinstance(value, str) or not value.strip():
        raise AuthenticationError(f"invalid claim {name}: must be a non-empty string")
    if len(value) > max_len:
        raise AuthenticationError(f"invalid claim {name}: longer than {max_len} characters")
    return value


MetadataLike = Mapping[str, str | bytes] | Iterable[tuple[str, str | bytes]] | None


def bearer_from_metadata(metadata: MetadataLike) -> str:
    """Return the token of the ``authorization: Bearer <token>`` metadata entry.

    Accepts gRPC invocation metadata (a sequence of ``(key, value)`` pairs) or a mapping. The key
    and the ``Bearer`` scheme are matched case-insensitively. A missing entry, another scheme or
    more than one ``authorization`` entry raises :class:`AuthenticationError`.
    """
    items = metadata.items() if isinstance(metadata, Mapping) else (metadata or ())
    values = [value for key, value in items if key.lower() == "authorization"]
    if not values:
        raise AuthenticationError(
            "missing authorization metadata: send 'authorization: Bearer <token>'"
        )
    if len(values) > 1:
        raise AuthenticationError("more than one authorization metadata entry")
    raw = values[0]
    text = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else raw
    match = _BEARER.match(text)
    if match is None:
        raise AuthenticationError("authorization metadata must be 'Bearer <token>'")
    return match.group(1)


def issue_token(
    *,
    actor_id: str,
    tenant_id: str,
    audience: str,
    hs256_key: SecretStr | None = None,
    rs256_private_key: str | bytes | RSAPrivateKey | None = None,
    ttl: timedelta = timedelta(minutes=15),
    issuer: str | None = None,
    auth_method: str = DEFAULT_AUTH_METHOD,
    token_id: str | None = None,
    now: datetime | None = None,
) -> str:
    """Mint a token for development and tests (HS256 with ``hs256_key``, RS256 with a private key).

    Production tokens come from the identity provider, never from this function: the services only
    hold the RS256 *public* key. ``now`` (default: the current time) sets ``iat`` and ``nbf``;
    ``exp`` is ``now + ttl``.
    """
    if (hs256_key is None) == (rs256_private_key is None):
        raise ValueError(_ONE_KEY)
    issued = now or datetime.now(UTC)
    claims: dict[str, Any] = {
        "sub": actor_id,
        "tenant_id": tenant_id,
        "aud": audience,
        "auth_method": auth_method,
        "iat": issued,
        "nbf": issued,
        "exp": issued + ttl,
    }
    if issuer is not None:
        claims["iss"] = issuer
    if token_id is not None:
        claims["jti"] = token_id
    if hs256_key is not None:
        return jwt.encode(claims, hs256_key.get_secret_value(), algorithm=_HS256)
    if rs256_private_key is None:  # pragma: no cover - excluded by the check above
        raise ValueError(_ONE_KEY)
    return jwt.encode(claims, _load_rs256_private_key(rs256_private_key), algorithm=_RS256)


def _load_rs256_private_key(key: str | bytes | RSAPrivateKey) -> RSAPrivateKey:
    if isinstance(key, RSAPrivateKey):
        return key
    loaded = serialization.load_pem_private_key(
        key.encode() if isinstance(key, str) else key, password=None
    )
    if not isinstance(loaded, RSAPrivateKey):
        raise ValueError("RS256 private key is not an RSA key")
    return loaded
