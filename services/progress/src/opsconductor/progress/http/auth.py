"""Who is calling over HTTP: a bearer token in ``Authorization``, or a stream ticket.

The bearer token is verified like a gRPC one. ``?ticket=`` (see :mod:`.tickets`) exists for
browsers' EventSource and WebSocket, which cannot send headers; a token is never accepted in a
query string (query strings end up in proxies' and browsers' histories).
"""

from __future__ import annotations

from starlette.requests import HTTPConnection

from opsconductor.common.auth import Principal, TokenVerifier
from opsconductor.common.errors import AuthenticationError
from opsconductor.progress.http.tickets import TicketIssuer

_BEARER = "bearer "


async def authenticate(
    connection: HTTPConnection, verifier: TokenVerifier, tickets: TicketIssuer
) -> Principal:
    """The verified caller; ``AuthenticationError`` for a missing or bad credential."""
    header = connection.headers.get("authorization")
    if header is not None:
        if not header.lower().startswith(_BEARER):
            raise AuthenticationError(
                "the Authorization header must hold the word Bearer, a space and your token"
            )
        return await verifier.verify_async(header[len(_BEARER) :].strip())
    ticket = connection.query_params.get("ticket")
    if ticket:
        return tickets.verify(ticket)
    raise AuthenticationError(
        'authentication required. Send the header "Authorization" with the value "Bearer" '
        "followed by your token, or pass a stream ticket (POST /v1/tickets) as the ticket "
        "query parameter"
    )
