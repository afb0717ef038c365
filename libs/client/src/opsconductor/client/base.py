"""What every typed client shares: one channel, one bearer token, domain errors for failures."""

from __future__ import annotations

from types import TracebackType
from typing import Any, Self

import grpc

from .errors import map_rpc_error
from .tls import ClientTls, open_channel

#: Longer than any SLA policy (fast 10 s, medium 30 s): the service enforces the policy itself
#: and reports DEADLINE_EXCEEDED, so the caller's deadline must not cut it short.
DEFAULT_TIMEOUT_S = 120.0


class ChannelClient:
    """Base of the typed clients: owns (or shares) a channel and sends one principal's token.

    Subclasses create their stubs in ``_bind``; ``with_token`` makes a client for another
    principal on the same channel. ``tls`` (a :class:`ClientTls`) dials TLS, or mTLS when it
    has a client certificate; without it the channel is plaintext (``make run``). The files
    are read once, when the channel is opened.
    """

    def __init__(
        self,
        target: str,
        token: str,
        *,
        channel: grpc.aio.Channel | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        tls: ClientTls | None = None,
    ) -> None:
        self._owns_channel = channel is None
        self._channel = channel if channel is not None else open_channel(target, tls)
        self._target = target
        self._token = token
        self._timeout = timeout
        self._bind(self._channel)

    def _bind(self, channel: grpc.aio.Channel) -> None:
        """Create the stubs this client calls."""

    def with_token(self, token: str) -> Self:
        """A client for another principal sharing this client's channel."""
        return type(self)(self._target, token, channel=self._channel, timeout=self._timeout)

    async def close(self) -> None:
        if self._owns_channel:
            await self._channel.close(None)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def _metadata(self, token: str | None = None) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {token or self._token}"),)

    async def _call(self, method: Any, request: Any, *, token: str | None = None) -> Any:
        """One unary call; a failure is raised as its domain exception."""
        try:
            return await method(request, metadata=self._metadata(token), timeout=self._timeout)
        except grpc.aio.AioRpcError as exc:
            raise map_rpc_error(exc) from exc
