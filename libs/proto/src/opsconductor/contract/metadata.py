"""Per-RPC request id: read from gRPC metadata or generated, held in a ``ContextVar``.

Every RPC runs in its own asyncio task, so a ``ContextVar`` set by the server interceptor is seen
by the servicer, the service logic and every log line of that RPC, and by nothing else.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable
from contextvars import ContextVar, Token

REQUEST_ID_METADATA_KEY = "x-request-id"
"""Metadata key a caller may set to correlate its request with our logs (echoed back)."""

#: Width of ``executions.request_id``: a longer id could not be stored with the execution.
MAX_REQUEST_ID_LENGTH = 100

# A caller-supplied id ends up in logs, trailers and the executions row: accept only short,
# plain tokens that fit the column, so it can neither forge log structure, nor smuggle a
# secret-sized blob, nor make the insert fail.
_ACCEPTABLE_REQUEST_ID = re.compile(rf"[A-Za-z0-9._:-]{{1,{MAX_REQUEST_ID_LENGTH}}}")

_request_id: ContextVar[str | None] = ContextVar("opsconductor_request_id", default=None)


def is_acceptable_request_id(text: str) -> bool:
    """Whether ``text`` is a request id we keep: a short plain token that fits its column."""
    return _ACCEPTABLE_REQUEST_ID.fullmatch(text) is not None


def new_request_id() -> str:
    """Return a fresh random request id (32 hex characters)."""
    return uuid.uuid4().hex


def request_id_from_metadata(metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
    """Return the caller's ``x-request-id`` when it is an acceptable token, else a new id.

    An unacceptable id (too long for its column, or other characters) is replaced rather than
    refused: it is optional correlation data, and the id actually used is echoed in the
    ``x-request-id`` trailer of every answer.
    """
    for key, value in metadata or ():
        if key.lower() != REQUEST_ID_METADATA_KEY:
            continue
        text = value.decode("ascii", "replace") if isinstance(value, bytes) else value
        if is_acceptable_request_id(text):
            return text
        break
    return new_request_id()


def current_request_id() -> str | None:
    """Return the id of the RPC being served by the current task, if any."""
    return _request_id.get()


def set_request_id(request_id: str) -> Token[str | None]:
    """Make ``request_id`` current; returns a token for :func:`reset_request_id`."""
    return _request_id.set(request_id)


def reset_request_id(token: Token[str | None]) -> None:
    """Restore the request id that was current before :func:`set_request_id`."""
    _request_id.reset(token)
