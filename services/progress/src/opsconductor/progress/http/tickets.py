"""Short-lived stream tickets: how a browser authenticates where it cannot send a header.

``EventSource`` cannot set ``Authorization`` and ``WebSocket`` only a subprotocol, so the page
trades its bearer token (sent as a header to ``POST /v1/tickets``) for a ticket of a minute,
passed as ``?ticket=`` on the stream URL. A ticket names the principal it was issued to and
is signed with HMAC-SHA256 under ``OPSC_STREAM_TICKET_KEY`` (replicas share it; without one
each process draws its own and a ticket works only on the replica that issued it). It is
never logged: the access log writes paths without query strings.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Callable

from opsconductor.common.auth import Principal
from opsconductor.common.errors import AuthenticationError


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class TicketIssuer:
    """Issues and checks stream tickets (see the module docstring)."""

    def __init__(
        self,
        key: bytes | None,
        *,
        ttl_s: int = 60,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._key = key or secrets.token_bytes(32)
        self.ttl_s = ttl_s
        self._clock = clock

    def __repr__(self) -> str:
        return f"TicketIssuer(ttl_s={self.ttl_s})"

    def issue(self, principal: Principal) -> str:
        """A ticket for ``principal`` valid for ``ttl_s`` seconds."""
        body = json.dumps(
            {
                "sub": principal.actor_id,
                "tenant_id": principal.tenant_id,
                "auth_method": principal.auth_method,
                "exp": int(self._clock()) + self.ttl_s,
            },
            separators=(",", ":"),
        ).encode()
        return f"{_b64(body)}.{_b64(self._sign(body))}"

    def verify(self, ticket: str) -> Principal:
        """The principal a valid, unexpired ticket names; ``AuthenticationError`` otherwise."""
        encoded, _, signature = ticket.partition(".")
        try:
            body = _unb64(encoded)
            given = _unb64(signature)
        except (binascii.Error, ValueError, UnicodeError):
            raise AuthenticationError("invalid stream ticket: request a new one") from None
        if not hmac.compare_digest(given, self._sign(body)):
            raise AuthenticationError("invalid stream ticket: request a new one")
        claims = json.loads(body)
        if claims["exp"] < self._clock():
            raise AuthenticationError("stream ticket expired: request a new one")
        return Principal(
            actor_id=claims["sub"],
            tenant_id=claims["tenant_id"],
            auth_method=f"{claims['auth_method']}+ticket",
        )

    def _sign(self, body: bytes) -> bytes:
        return hmac.new(self._key, b"opsc-stream-ticket:" + body, hashlib.sha256).digest()
