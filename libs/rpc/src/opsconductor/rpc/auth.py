"""Who is calling: the bearer token of a gRPC request, verified into a ``Principal``."""

from __future__ import annotations

from typing import Any

import grpc.aio

from opsconductor.common.auth import Principal, TokenVerifier, bearer_from_metadata


async def authenticate(
    context: grpc.aio.ServicerContext[Any, Any], verifier: TokenVerifier
) -> tuple[Principal, str]:
    """The verified caller and its raw token (forwarded to the worker for its own check).

    Raises ``AuthenticationError`` (UNAUTHENTICATED) for a missing, expired or bad token.
    Async: a token signed by a key the JWKS does not list yet makes the verifier fetch it.
    """
    token = bearer_from_metadata(context.invocation_metadata() or ())
    return await verifier.verify_async(token), token


def peer_ip(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    """The caller's address as gRPC reports it (``ipv4:1.2.3.4:5678`` -> ``1.2.3.4``)."""
    peer = context.peer() or ""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rsplit(":", 1)[0]
    if kind == "ipv6":
        return rest.rsplit(":", 1)[0].strip("[]")
    return peer
