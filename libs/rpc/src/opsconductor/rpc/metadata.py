"""The per-RPC request id, defined in the contract package the client shares
(:mod:`opsconductor.contract.metadata`); re-exported here for the server code.
"""

from __future__ import annotations

from opsconductor.contract.metadata import (
    MAX_REQUEST_ID_LENGTH,
    REQUEST_ID_METADATA_KEY,
    current_request_id,
    new_request_id,
    request_id_from_metadata,
    reset_request_id,
    set_request_id,
)

__all__ = [
    "MAX_REQUEST_ID_LENGTH",
    "REQUEST_ID_METADATA_KEY",
    "current_request_id",
    "new_request_id",
    "request_id_from_metadata",
    "reset_request_id",
    "set_request_id",
]
