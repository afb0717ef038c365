"""Event records ↔ protobuf ``ExecutionEvent`` (shared by gRPC and grpc-web)."""

from __future__ import annotations

from google.protobuf import struct_pb2, timestamp_pb2

from opsconductor.common.storage.event_reads import EventRecord
from opsconductor.execution.v1 import types_pb2


def event_to_proto(event: EventRecord) -> types_pb2.ExecutionEvent:
    """The protobuf form of one event (payload as a ``Struct``, time as a ``Timestamp``)."""
    payload = struct_pb2.Struct()
    payload.update(dict(event.payload))
    created = timestamp_pb2.Timestamp()
    created.FromDatetime(event.created_at)
    return types_pb2.ExecutionEvent(
        execution_id=str(event.execution_id) if event.execution_id else "",
        seq=event.seq,
        type=event.type,
        payload=payload,
        created_at=created,
        tenant_id=event.tenant_id,
        actor_id=event.actor_id or "",
    )
