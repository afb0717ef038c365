"""The identity provider's signing keys from its JWKS endpoint, selected by ``kid``, for RS256.

Why not PyJWT's ``PyJWKClient``: it fetches with blocking ``urllib`` inside the call that needs
the key, which would stall the event loop (every RPC of the process) for up to its timeout.
Here the set is fetched with ``httpx``'s async client, parsed by PyJWT's own ``PyJWKSet``, and
kept in memory:

- at start-up, then every ``refresh_s`` seconds in the background (a key the IdP retires
  disappears; a key it publishes ahead of a rotation is known before the first token uses it);
- on a token whose ``kid`` is unknown, at most once per ``min_refresh_s`` seconds (the cooldown
  is shared by every caller, and concurrent callers wait on one fetch): random ``kid`` values
  from an attacker cost us one request per cooldown, not one per token. The scheduled fetches
  do not count against it, so a key rotated just after start-up is fetched at once; while an
  attacker keeps the cooldown busy, a genuinely new ``kid`` waits at most ``min_refresh_s``;
- with a timeout (``timeout_s``), no redirects, a size limit; a failed fetch keeps the keys
  already known (an IdP outage does not log everybody out).

Only RSA keys usable for signatures with RS256 are kept (``kty: RSA``, ``use`` absent or
``sig``, ``alg`` absent or ``RS256``): the algorithm stays pinned by our configuration, never by
the key set or the token.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any, Final

import httpx
import jwt
import structlog

__all__ = ["JwksKeys"]

log = structlog.get_logger(__name__)

#: A JWKS is a few KiB; refuse to parse anything much larger.
MAX_JWKS_BYTES: Final = 256 * 1024
_RS256: Final = "RS256"


class JwksKeys:
    """RS256 public keys by ``kid``, from one JWKS URL, refreshed as described above."""

    def __init__(
        self,
        url: str,
        *,
        refresh_s: float = 300.0,
        min_refresh_s: float = 30.0,
        timeout_s: float = 5.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.url = url
        self._refresh_s = refresh_s
        self._min_refresh_s = min_refresh_s
        self._timeout_s = timeout_s
        self._transport = transport
        self._keys: dict[str, Any] = {}
        self._on_demand_at: float | None = None  # monotonic time of the last unknown-kid fetch
        self._inflight: asyncio.Task[None] | None = None
        self._periodic: asyncio.Task[None] | None = None
        #: Fetches attempted so far (tests and the log use it).
        self.fetches = 0

    @property
    def kids(self) -> frozenset[str]:
        return frozenset(self._keys)

    def cached(self, kid: str) -> Any | None:
        """The key with this ``kid`` if already known (no I/O)."""
        return self._keys.get(kid)

    async def key_for(self, kid: str) -> Any | None:
        """The key with this ``kid``, refreshing the set once if it is unknown and the cooldown
        allows; ``None`` if the IdP does not publish it."""
        key = self._keys.get(kid)
        if key is not None:
            return key
        now = time.monotonic()
        if self._on_demand_at is None or now - self._on_demand_at >= self._min_refresh_s:
            self._on_demand_at = now
            await self.refresh()
        elif self._inflight is not None:
            await asyncio.shield(self._inflight)  # a fetch under way may bring it
        return self._keys.get(kid)

    async def refresh(self) -> None:
        """Fetch the set now (callers arriving meanwhile share this fetch). Never raises."""
        if self._inflight is None:
            self._inflight = asyncio.ensure_future(self._fetch())
        inflight = self._inflight
        try:
            await asyncio.shield(inflight)
        finally:
            if inflight.done() and self._inflight is inflight:
                self._inflight = None

    async def start(self) -> None:
        """First fetch, then the periodic refresh in the background."""
        await self.refresh()
        if self._periodic is None:
            self._periodic = asyncio.ensure_future(self._refresh_periodically())

    async def close(self) -> None:
        for task in (self._periodic, self._inflight):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._periodic = self._inflight = None

    async def _refresh_periodically(self) -> None:
        while True:
            await asyncio.sleep(self._refresh_s)
            await self.refresh()

    async def _fetch(self) -> None:
        self.fetches += 1
        try:
            async with httpx.AsyncClient(
                timeout=self._timeout_s, follow_redirects=False, transport=self._transport
            ) as client:
                response = await client.get(self.url, headers={"accept": "application/json"})
            if response.status_code != 200:
                raise ValueError(f"HTTP {response.status_code}")
            if len(response.content) > MAX_JWKS_BYTES:
                raise ValueError(f"larger than {MAX_JWKS_BYTES} bytes")
            keys = _rs256_keys(response.json())
        except (httpx.HTTPError, ValueError) as exc:
            # Keep what we have: an IdP outage must not refuse tokens signed by known keys.
            log.warning(
                "jwks_fetch_failed", url=self.url, reason=_reason(exc), kept=len(self._keys)
            )
            return
        added = sorted(set(keys) - set(self._keys))
        removed = sorted(set(self._keys) - set(keys))
        self._keys = keys
        if added or removed:
            log.info("jwks_keys_changed", url=self.url, added=added, removed=removed)


def _rs256_keys(document: Any) -> dict[str, Any]:
    """``kid`` → public key, for the usable RS256 signing keys of a JWKS document."""
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError("not a JWKS document (no 'keys' list)")
    keys: dict[str, Any] = {}
    for entry in document["keys"]:
        if not isinstance(entry, dict):
            continue
        kid = entry.get("kid")
        if not isinstance(kid, str) or not kid or entry.get("kty") != "RSA":
            continue
        if entry.get("use", "sig") != "sig" or entry.get("alg", _RS256) != _RS256:
            continue
        try:
            keys[kid] = jwt.PyJWK.from_dict(entry, algorithm=_RS256).key
        except jwt.PyJWTError:
            continue  # one malformed key must not hide the others
    return keys


def _reason(exc: Exception) -> str:
    if isinstance(exc, httpx.TimeoutException):
        return "timeout"
    if isinstance(exc, httpx.HTTPError):
        return type(exc).__name__
    return str(exc)
