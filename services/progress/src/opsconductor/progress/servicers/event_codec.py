"""Event records ↔ protobuf ``ExecutionEvent`` (shared by gRPC and grpc-web)."""

from __future__ import annotations

import collections

from google.protobuf import struct_pb2, timestamp_pb2

from opsconductor.execution.v1 import progress_service_pb2, types_pb2
from opsconductor.lifecycle.storage.event_reads import EventRecord


class EventEncoder:
    """:func:`event_to_proto` once per event however many subscribers send it.

    The hub hands the same record to every subscriber of an execution; the last few encoded
    events are kept, keyed by (execution, seq).
    """

    def __init__(self, size: int = 256) -> None:
        self._size = size
        self._cache: collections.OrderedDict[tuple[object, int], types_pb2.ExecutionEvent] = (
            collections.OrderedDict()
        )
        self._frames: collections.OrderedDict[tuple[object, int], bytes] = collections.OrderedDict()

    def encode(self, event: EventRecord) -> types_pb2.ExecutionEvent:
        key = (event.execution_id, event.seq if event.execution_id else -event.id)
        message = self._cache.get(key)
        if message is None:
            message = self._cache[key] = event_to_proto(event)
            if len(self._cache) > self._size:
                self._cache.popitem(last=False)
        return message

    def stream_frame(self, event: EventRecord) -> bytes:
        """The serialised ``StreamEventsResponse`` of ``event``, built once for every
        subscriber (a thousand subscribers of one execution share the same bytes)."""
        key = (event.execution_id, event.seq if event.execution_id else -event.id)
        frame = self._frames.get(key)
        if frame is None:
            frame = self._frames[key] = progress_service_pb2.StreamEventsResponse(
                event=self.encode(event)
            ).SerializeToString()
            if len(self._frames) > self._size:
                self._frames.popitem(last=False)
        return frame


def serialize_stream_response(response: bytes | progress_service_pb2.StreamEventsResponse) -> bytes:
    """The response serializer of ``StreamEvents``: pre-serialised frames pass as they are."""
    if isinstance(response, bytes):
        return response
    return response.SerializeToString()


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
