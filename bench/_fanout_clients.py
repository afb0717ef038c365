"""Light subscriber clients for ``progress_fanout.py``: many streams, few Python objects each.

The measured figure is commit → bytes at the subscriber. On a 2-core machine the subscribers
share the CPU with the server they measure, so their own cost must stay small: a client that
decodes protobuf and resumes a coroutine per message (grpc.aio) delays the server it is meant
to time. These clients speak the wire protocol directly from an ``asyncio.Protocol``:

* **gRPC**: HTTP/2 with prior knowledge (h2c), many streams per connection. One timestamp per
  socket read; a DATA frame is kept as (time, stream, bytes); nothing is decoded until the run
  is over. Flow-control windows are opened to the maximum at the start, so no WINDOW_UPDATE is
  ever due; SETTINGS and PING are acknowledged. Request headers are HPACK literals without
  indexing (no dynamic table on our side); the server's headers are never decoded: the first
  HEADERS frame of a stream means "subscribed" (the servicer sends its headers once it is),
  one with END_STREAM means the stream is over.
* **SSE**: HTTP/1.1, one connection per subscriber (as a browser's EventSource); each read is
  kept as (time, bytes) and parsed afterwards.

Afterwards every stream is turned into (seq, arrival time) pairs: the arrival of an event is
the time of the read that completed it.
"""

from __future__ import annotations

import asyncio
import functools
import struct
import time
from collections.abc import Sequence
from typing import Any

from opsconductor.execution.v1 import progress_service_pb2

_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_DATA, _HEADERS, _RST_STREAM, _SETTINGS, _PING, _GOAWAY = 0x0, 0x1, 0x3, 0x4, 0x6, 0x7
_END_STREAM, _ACK, _END_HEADERS = 0x1, 0x1, 0x4
_MAX_WINDOW = 2**31 - 1
_SETTINGS_ENABLE_PUSH, _SETTINGS_INITIAL_WINDOW_SIZE = 0x2, 0x4
_STREAM_EVENTS_PATH = "/opsconductor.execution.v1.ProgressService/StreamEvents"


def _frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return (
        struct.pack(">I", len(payload))[1:]
        + bytes((kind, flags))
        + struct.pack(">I", stream)
        + payload
    )


def _hpack_int(value: int, prefix_bits: int, first: int = 0) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out = bytearray((first | limit,))
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _hpack_literal(name: str, value: str) -> bytes:
    """A literal header field without indexing, new name, no Huffman (RFC 7541 §6.2.2)."""
    raw_name, raw_value = name.encode(), value.encode()
    return (
        b"\x00"
        + _hpack_int(len(raw_name), 7)
        + raw_name
        + _hpack_int(len(raw_value), 7)
        + raw_value
    )


class Ready:
    """Counts subscribed streams over every connection of a client process."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.count = 0
        self.all = asyncio.Event()
        self.ended = 0
        self.all_ended = asyncio.Event()

    def subscribed(self) -> None:
        self.count += 1
        if self.count == self.expected:
            self.all.set()

    def ended_one(self) -> None:
        self.ended += 1
        if self.ended == self.expected:
            self.all_ended.set()


class _GrpcConnection(asyncio.Protocol):
    """One HTTP/2 connection carrying ``streams`` StreamEvents calls."""

    def __init__(self, ready: Ready, authority: str, token: str, request: bytes, streams: int):
        self._ready = ready
        self._streams = streams
        self._header_block = b"".join(
            _hpack_literal(k, v)
            for k, v in (
                (":method", "POST"),
                (":scheme", "http"),
                (":path", _STREAM_EVENTS_PATH),
                (":authority", authority),
                ("content-type", "application/grpc"),
                ("te", "trailers"),
                ("authorization", f"Bearer {token}"),
            )
        )
        self._body = b"\x00" + struct.pack(">I", len(request)) + request
        self._buffer = b""
        self._transport: asyncio.Transport | None = None
        self._seen: set[int] = set()
        #: (arrival, stream id, DATA payload), in arrival order.
        self.chunks: list[tuple[float, int, bytes]] = []
        self.errors: list[str] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        settings = struct.pack(">HI", _SETTINGS_ENABLE_PUSH, 0) + struct.pack(
            ">HI", _SETTINGS_INITIAL_WINDOW_SIZE, _MAX_WINDOW
        )
        out = [
            _PREFACE,
            _frame(_SETTINGS, 0, 0, settings),
            _frame(0x8, 0, 0, struct.pack(">I", _MAX_WINDOW - 65535)),  # WINDOW_UPDATE
        ]
        for index in range(self._streams):
            stream = 2 * index + 1
            out.append(_frame(_HEADERS, _END_HEADERS, stream, self._header_block))
            out.append(_frame(_DATA, _END_STREAM, stream, self._body))
        transport.write(b"".join(out))

    def data_received(self, data: bytes) -> None:
        now = time.time()
        buffer = self._buffer + data if self._buffer else data
        offset, size = 0, len(buffer)
        while size - offset >= 9:
            length = int.from_bytes(buffer[offset : offset + 3], "big")
            end = offset + 9 + length
            if end > size:
                break
            kind = buffer[offset + 3]
            flags = buffer[offset + 4]
            stream = int.from_bytes(buffer[offset + 5 : offset + 9], "big") & 0x7FFFFFFF
            if kind == _DATA:
                if length:
                    self.chunks.append((now, stream, buffer[offset + 9 : end]))
                if flags & _END_STREAM:
                    self._end(stream)
            elif kind == _HEADERS:
                if stream not in self._seen:
                    self._seen.add(stream)
                    if not flags & _END_STREAM:
                        self._ready.subscribed()
                    else:
                        self.errors.append(f"stream {stream} refused (trailers only)")
                        self._ready.subscribed()
                if flags & _END_STREAM:
                    self._end(stream)
            elif kind == _SETTINGS and not flags & _ACK:
                self._send(_frame(_SETTINGS, _ACK, 0, b""))
            elif kind == _PING and not flags & _ACK:
                self._send(_frame(_PING, _ACK, 0, buffer[offset + 9 : end]))
            elif kind == _RST_STREAM:
                self.errors.append(f"stream {stream} reset")
                self._end(stream)
            elif kind == _GOAWAY:
                self.errors.append("GOAWAY")
            offset = end
        self._buffer = buffer[offset:]

    def _end(self, stream: int) -> None:
        self._ready.ended_one()

    def _send(self, data: bytes) -> None:
        if self._transport is not None:
            self._transport.write(data)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def results(self) -> list[list[tuple[int, float]]]:
        """Per stream: (seq, arrival) of every gRPC message received."""
        per_stream: dict[int, list[tuple[float, bytes]]] = {}
        for now, stream, payload in self.chunks:
            per_stream.setdefault(stream, []).append((now, payload))
        out = []
        for index in range(self._streams):
            out.append(_grpc_messages(per_stream.get(2 * index + 1, [])))
        return out


def _grpc_messages(chunks: Sequence[tuple[float, bytes]]) -> list[tuple[int, float]]:
    got = []
    pending = b""
    for now, payload in chunks:
        pending += payload
        while len(pending) >= 5:
            length = int.from_bytes(pending[1:5], "big")
            if len(pending) < 5 + length:
                break
            message = progress_service_pb2.StreamEventsResponse.FromString(pending[5 : 5 + length])
            got.append((message.event.seq, now))
            pending = pending[5 + length :]
    return got


class _SseConnection(asyncio.Protocol):
    """One HTTP/1.1 connection: one SSE subscriber."""

    def __init__(self, ready: Ready, request: bytes) -> None:
        self._ready = ready
        self._request = request
        self._subscribed = False
        self._ended = False
        self._transport: asyncio.Transport | None = None
        #: (arrival, bytes) of every read.
        self.chunks: list[tuple[float, bytes]] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        transport.write(self._request)

    def data_received(self, data: bytes) -> None:
        self.chunks.append((time.time(), data))
        if not self._subscribed:
            # The response starts once the subscription exists (headers, then "retry:").
            self._subscribed = True
            self._ready.subscribed()
        # The terminal event is followed by "event: end" and the last chunk of the body.
        if not self._ended and data.endswith(b"0\r\n\r\n"):
            self._ended = True
            self._ready.ended_one()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._ended:
            self._ended = True
            self._ready.ended_one()

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def results(self) -> list[list[tuple[int, float]]]:
        """(seq, arrival) of every event: the ``id:`` of the event, the read that ended it."""
        stream = b"".join(data for _, data in self.chunks)
        ends = []
        total = 0
        for now, data in self.chunks:
            total += len(data)
            ends.append((total, now))
        got = []
        position = 0
        chunk = 0
        while (start := stream.find(b"\nid: ", position)) != -1:
            line_end = stream.index(b"\n", start + 1)
            seq = int(stream[start + 5 : line_end])
            event_end = stream.index(b"\n\n", line_end) + 2
            while ends[chunk][0] < event_end:
                chunk += 1
            got.append((seq, ends[chunk][1]))
            position = event_end - 1  # the next event's id line follows this newline
        return [got]


async def run_clients(
    transport: str,
    host: str,
    port: int,
    token: str,
    tenant_id: str,
    execution_id: str,
    count: int,
    *,
    streams_per_connection: int = 100,
) -> tuple[Ready, list[_GrpcConnection] | list[_SseConnection]]:
    """Open ``count`` subscriptions; returns once every one is subscribed."""
    loop = asyncio.get_running_loop()
    ready = Ready(count)
    connections: list[Any] = []
    if transport == "grpc":
        request = progress_service_pb2.StreamEventsRequest(
            tenant_id=tenant_id, execution_id=execution_id
        ).SerializeToString()
        left = count
        while left:
            streams = min(left, streams_per_connection)
            left -= streams
            factory = functools.partial(
                _GrpcConnection, ready, f"{host}:{port}", token, request, streams
            )
            _, conn = await loop.create_connection(factory, host, port)
            connections.append(conn)
    else:
        path = f"/v1/tenants/{tenant_id}/executions/{execution_id}/events/sse"
        request = (
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {token}\r\n"
            "Accept: text/event-stream\r\n\r\n"
        ).encode()
        for start in range(0, count, 50):
            batch = await asyncio.gather(
                *(
                    loop.create_connection(lambda: _SseConnection(ready, request), host, port)
                    for _ in range(min(50, count - start))
                )
            )
            connections.extend(conn for _, conn in batch)
    await ready.all.wait()
    return ready, connections
