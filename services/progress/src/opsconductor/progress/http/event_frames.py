"""What the HTTP transports send for an event, encoded once for all its subscribers.

The hub hands the same event to every subscriber of an execution; with a thousand of them,
encoding its JSON per subscriber was a thousand identical ``json.dumps`` per event. The last
few frames are kept, keyed by (execution, seq): a subscriber replaying old events from the
database misses the cache and encodes its own, with the same result.
"""

from __future__ import annotations

import collections
import json
from typing import Any
from uuid import UUID

from opsconductor.lifecycle.storage.event_reads import EventRecord


def dump_json(value: Any) -> str:
    """Compact JSON, as every HTTP transport sends it."""
    return json.dumps(value, separators=(",", ":"), default=str)


class EventFrames:
    """SSE and WebSocket frames of events, shared by the subscribers of one process."""

    def __init__(self, size: int = 256) -> None:
        self._size = size
        self._sse: collections.OrderedDict[tuple[UUID | None, int], bytes] = (
            collections.OrderedDict()
        )
        self._ws: collections.OrderedDict[tuple[UUID | None, int], str] = collections.OrderedDict()

    def sse(self, event: EventRecord) -> bytes:
        """``id: <seq>`` and ``data: <event JSON>``: one Server-Sent Event."""
        key = (event.execution_id, event.seq)
        frame = self._sse.get(key)
        if frame is None:
            frame = f"id: {event.seq}\ndata: {dump_json(event.to_json_dict())}\n\n".encode()
            self._remember(self._sse, key, frame)
        return frame

    def websocket(self, event: EventRecord) -> str:
        """``{"event": <event JSON>}``: one WebSocket text message."""
        key = (event.execution_id, event.seq)
        frame = self._ws.get(key)
        if frame is None:
            frame = dump_json({"event": event.to_json_dict()})
            self._remember(self._ws, key, frame)
        return frame

    def _remember(self, cache: collections.OrderedDict[Any, Any], key: Any, frame: Any) -> None:
        cache[key] = frame
        if len(cache) > self._size:
            cache.popitem(last=False)
