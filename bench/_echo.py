"""The raw gRPC baseline: a unary echo server in a process of its own, and a client for it.

Run as a script, this file is the server: a bare ``grpc.aio`` server on ``127.0.0.1`` (ephemeral
port, written to ``OPSC_PORT_FILE``) with one method, ``/opsc.bench.Echo/Echo``, that returns the
request bytes unchanged. It uses a generic handler with no (de)serializers, so there is no proto
code generation and no protobuf work on either side: what a call costs is grpcio itself (HTTP/2
framing, the asyncio/C-core hand-offs, the loopback round trip). No interceptors, no health
service, no logging. It stops on SIGTERM or SIGINT.

Imported, it gives :func:`echo_method` (the client call) and :func:`wait_echo_ready`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, Protocol, cast

import grpc
import grpc.aio

SERVICE = "opsc.bench.Echo"
METHOD = f"/{SERVICE}/Echo"


class EchoCall(Protocol):
    """The echo method: bytes in, the same bytes out."""

    def __call__(self, request: bytes, *, timeout: float | None = None) -> Awaitable[bytes]: ...


async def _echo(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
    return request


async def _serve(port_file: Path) -> None:
    server = grpc.aio.server()
    handler = grpc.method_handlers_generic_handler(
        SERVICE, {"Echo": grpc.unary_unary_rpc_method_handler(_echo)}
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    # Written last and atomically: a reader that sees the port can call it.
    tmp = port_file.with_suffix(".tmp")
    tmp.write_text(str(port))
    tmp.replace(port_file)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await server.stop(1.0)


def echo_method(channel: grpc.aio.Channel) -> EchoCall:
    """The echo call on ``channel``: bytes in, the same bytes out."""
    # No (de)serializers: raw bytes both ways (the stubs do not know that None is allowed).
    call: Any = channel.unary_unary(METHOD)  # type: ignore[call-arg]
    return cast(EchoCall, call)


async def wait_echo_ready(address: str, within_s: float = 30.0) -> None:
    """Call the echo until it answers (the port file is written after ``server.start``)."""
    deadline = time.monotonic() + within_s
    async with grpc.aio.insecure_channel(address) as channel:
        call = echo_method(channel)
        while True:
            with contextlib.suppress(grpc.aio.AioRpcError):
                if await call(b"ping", timeout=1.0) == b"ping":
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"echo server at {address} did not answer within {within_s} s")
            await asyncio.sleep(0.05)


def main() -> int:
    port_file = os.environ.get("OPSC_PORT_FILE")
    if not port_file:
        print("usage: OPSC_PORT_FILE=/path/to/port python bench/_echo.py", file=sys.stderr)
        return 2
    asyncio.run(_serve(Path(port_file)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
