"""Raw gRPC calls for the edge tests: bytes or messages in, (code, details) out, never a raise.

The typed client cannot send what a hostile caller sends (undecodable bytes, NaN in a Struct,
a 120-character request id), so these helpers speak to the services below it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import grpc
import grpc.aio

#: What must never reach a caller: a Python class name, a traceback, a module path.
LEAK = re.compile(r"<class '|Traceback|File \"|\.py\b|DecodeError|ValueError|KeyError|TypeError")

#: Codes a bad request must never get.
FORBIDDEN_CODES = frozenset(
    {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.UNAVAILABLE}
)


async def raw_call(
    channel: grpc.aio.Channel,
    method: str,
    payload: bytes | Any,
    *,
    bearer: str | None = None,
    metadata: Sequence[tuple[str, str]] = (),
    timeout: float = 30.0,
    streaming: bool = False,
) -> tuple[grpc.StatusCode, str]:
    """Call ``method`` (``/pkg.Service/Method``) with ``payload`` (raw bytes or a message)."""
    body = payload if isinstance(payload, bytes) else payload.SerializeToString()
    call_metadata = [*metadata]
    if bearer is not None:
        call_metadata.append(("authorization", f"Bearer {bearer}"))
    try:
        if streaming:
            stream = channel.unary_stream(method)(body, metadata=call_metadata, timeout=timeout)
            async for _ in stream:
                # A stream that answers at all is not a refusal; one reply is enough to know.
                stream.cancel()
                return grpc.StatusCode.OK, ""
            return grpc.StatusCode.OK, ""
        await channel.unary_unary(method)(body, metadata=call_metadata, timeout=timeout)
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


def assert_clean_refusal(code: grpc.StatusCode, details: str, *, what: str) -> None:
    """A refusal with an acceptable code and a detail that leaks no internals."""
    assert code not in FORBIDDEN_CODES, f"{what}: {code.name} {details!r}"
    assert not LEAK.search(details), f"{what}: the detail leaks internals: {details!r}"


def _varint(number: int) -> bytes:
    out = bytearray()
    while True:
        byte, number = number & 0x7F, number >> 7
        out.append(byte | (0x80 if number else 0))
        if not number:
            return bytes(out)


def length_delimited(number: int, body: bytes) -> bytes:
    """Field ``number`` holding ``body`` (wire type 2): for messages protobuf will not build."""
    return _varint(number << 3 | 2) + _varint(len(body)) + body


def deep_params_plan(depth: int) -> bytes:
    """A ``Plan`` (bytes) whose step params nest ``depth`` Structs deep; protobuf itself refuses
    to build one beyond its recursion limit, so it is written field by field."""
    params = b""
    for _ in range(depth):
        value = length_delimited(5, params)  # Value.struct_value
        params = length_delimited(1, length_delimited(1, b"a") + length_delimited(2, value))
    step = length_delimited(1, b"s1") + length_delimited(5, params)
    return length_delimited(1, b"deep") + length_delimited(2, step)
