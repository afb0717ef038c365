"""The edge of every gRPC server: concurrency and message-size limits, undecodable requests and
NUL characters, each answered with a status a caller can act on — never a hang, never UNKNOWN.

A real ``grpc.aio`` server built by the shared bootstrap, with a servicer that blocks until told.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest

from opsconductor.execution.v1 import execution_service_pb2, execution_service_pb2_grpc
from opsconductor.rpc.server import RpcServer, build_server

_CANCEL = "/opsconductor.execution.v1.ExecutionService/CancelExecution"


@dataclass(frozen=True)
class LimitedSettings:
    service_name: str = "limits-test"
    grpc_host: str = "127.0.0.1"
    grpc_port: int = 0
    metrics_port: int | None = None
    shutdown_grace_s: float = 1.0
    otel_enabled: bool = False
    port_file: Path | None = None
    grpc_max_concurrent_rpcs: int = 2
    grpc_max_message_bytes: int = 64 * 1024


class BlockingServicer(execution_service_pb2_grpc.ExecutionServiceServicer):
    """CancelExecution waits for ``release``; it records what it was given."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.entered = 0
        self.reasons: list[str] = []

    async def CancelExecution(
        self, request: execution_service_pb2.CancelExecutionRequest, context: Any
    ) -> execution_service_pb2.CancelExecutionResponse:
        self.entered += 1
        self.reasons.append(request.reason)
        await self.release.wait()
        return execution_service_pb2.CancelExecutionResponse()


@pytest.fixture
async def limited() -> AsyncIterator[tuple[RpcServer, BlockingServicer, grpc.aio.Channel]]:
    servicer = BlockingServicer()

    def register(server: grpc.aio.Server) -> list[str]:
        execution_service_pb2_grpc.add_ExecutionServiceServicer_to_server(servicer, server)
        return ["opsconductor.execution.v1.ExecutionService"]

    rpc = build_server(LimitedSettings(), register)
    await rpc.start()
    await rpc.mark_serving()
    channel = grpc.aio.insecure_channel(rpc.address)
    try:
        yield rpc, servicer, channel
    finally:
        servicer.release.set()
        await channel.close()
        await rpc.stop(None)


async def _cancel(channel: grpc.aio.Channel, payload: bytes) -> tuple[grpc.StatusCode, str]:
    try:
        await channel.unary_unary(_CANCEL)(payload, timeout=10)
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


async def test_beyond_the_concurrency_limit_calls_are_refused_at_once(
    limited: tuple[RpcServer, BlockingServicer, grpc.aio.Channel],
) -> None:
    """Two calls in flight hold the server's two slots; the third is RESOURCE_EXHAUSTED now,
    not queued behind them."""
    _, servicer, channel = limited
    request = execution_service_pb2.CancelExecutionRequest(reason="r").SerializeToString()
    held = [asyncio.ensure_future(_cancel(channel, request)) for _ in range(2)]
    async with asyncio.timeout(5):
        while servicer.entered < 2:
            await asyncio.sleep(0.01)
    loop = asyncio.get_running_loop()
    started = loop.time()
    code, _ = await _cancel(channel, request)
    assert code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert loop.time() - started < 2.0
    servicer.release.set()
    assert [await call for call in held] == [(grpc.StatusCode.OK, "")] * 2


async def test_a_message_over_the_size_limit_is_refused_before_decoding(
    limited: tuple[RpcServer, BlockingServicer, grpc.aio.Channel],
) -> None:
    """A request bigger than ``grpc_max_message_bytes`` never reaches the servicer."""
    _, servicer, channel = limited
    big = execution_service_pb2.CancelExecutionRequest(reason="x" * (65 * 1024))
    code, _ = await _cancel(channel, big.SerializeToString())
    assert code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert servicer.entered == 0


@pytest.mark.parametrize(
    "payload",
    [b"\x1a\x02\xc3\x28", b"\xff\xff\xff", b"\x1a\x10abc"],
    ids=["bad_utf8", "garbage", "truncated"],
)
async def test_undecodable_requests_are_invalid_argument_naming_the_message(
    limited: tuple[RpcServer, BlockingServicer, grpc.aio.Channel], payload: bytes
) -> None:
    """Not grpcio's UNKNOWN "Unexpected <class 'DecodeError'>": INVALID_ARGUMENT, no class."""
    _, servicer, channel = limited
    code, details = await _cancel(channel, payload)
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert "could not be decoded as CancelExecutionRequest" in details
    assert "<class" not in details
    assert "DecodeError" not in details
    assert servicer.entered == 0


async def test_nul_characters_in_text_fields_are_invalid_argument_naming_the_field(
    limited: tuple[RpcServer, BlockingServicer, grpc.aio.Channel],
) -> None:
    """Postgres text cannot hold NUL: refused at the edge, with the field, before any query."""
    _, servicer, channel = limited
    request = execution_service_pb2.CancelExecutionRequest(execution_id="e", reason="a\x00b")
    code, details = await _cancel(channel, request.SerializeToString())
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert details == "reason must not contain NUL characters"
    assert servicer.entered == 0
