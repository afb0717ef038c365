"""Development tokens for ``opsctl token``: HS256 JWTs signed with the local stack's key file.

Only a development stack (``make run``: ``.devstack/jwt-hs256.key``) has such a key; production
services verify RS256/JWKS tokens from the identity provider and hold no signing key, so there
is nothing to mint for them. Without the key file the command refuses rather than guessing. The
claims are the ones the services read (``sub``, ``tenant_id``, ``aud``, ``auth_method``, ``iat``,
``nbf``, ``exp``); the signature is the standard library's HMAC, so the client needs no JWT
library.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from pathlib import Path
from typing import Final

__all__ = ["DEFAULT_AUDIENCE", "DEFAULT_KEY_FILE", "DevKeyError", "mint_dev_token"]

DEFAULT_AUDIENCE: Final = "opsconductor-execution"
#: Where ``make run`` keeps its key, relative to the repository it runs in.
DEFAULT_KEY_FILE: Final = Path(".devstack") / "jwt-hs256.key"
#: The services refuse HS256 keys shorter than this.
_MIN_KEY_BYTES: Final = 32


class DevKeyError(Exception):
    """The development signing key is missing or unusable."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def read_dev_key(path: Path) -> bytes:
    """The key in ``path`` (whitespace stripped); :class:`DevKeyError` when it is not there."""
    try:
        key = path.read_bytes().strip()
    except FileNotFoundError:
        raise DevKeyError(
            f"no development key at {path}: tokens are minted only for a development stack "
            "(make run creates the key); production tokens come from your identity provider"
        ) from None
    except OSError as exc:
        raise DevKeyError(f"cannot read the development key {path}: {exc.strerror}") from None
    if len(key) < _MIN_KEY_BYTES:
        raise DevKeyError(f"the development key {path} is shorter than {_MIN_KEY_BYTES} bytes")
    return key


def mint_dev_token(
    key: bytes,
    *,
    actor: str,
    tenant: str,
    ttl_s: int,
    audience: str = DEFAULT_AUDIENCE,
    now: float | None = None,
) -> str:
    """An HS256 JWT for ``actor`` in ``tenant`` valid for ``ttl_s`` seconds."""
    issued = int(time.time() if now is None else now)
    header = {"alg": "HS256", "typ": "JWT"}
    claims = {
        "sub": actor,
        "tenant_id": tenant,
        "aud": audience,
        "auth_method": "dev_token",
        "iat": issued,
        "nbf": issued,
        "exp": issued + ttl_s,
    }
    signing_input = ".".join(
        _b64(json.dumps(part, separators=(",", ":")).encode()) for part in (header, claims)
    )
    signature = hmac.new(key, signing_input.encode("ascii"), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(signature)}"
