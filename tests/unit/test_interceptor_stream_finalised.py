"""A streaming call whose caller left while the servicer was suspended at a ``yield``.

grpc then drops the interceptor's wrapper (an async generator) without closing it; the event loop
finalises it later in a task of its own, outside the RPC's context and after grpc freed the call.
The wrapper's clean-up must touch neither the freed call (``context.peer()`` there dereferenced
NULL: the progress service died of a segfault under the edge fuzz) nor the RPC's context-variable
tokens (``ValueError: … created in a different Context``, logged as an unretrieved task error).
Run in a child process, so a segfault fails this test instead of ending the test run.
"""

from __future__ import annotations

import subprocess
import sys

SCENARIO = r"""
import asyncio, gc, grpc, grpc.aio
from opsconductor.rpc.interceptors import ServerObservabilityInterceptor

async def endless(request, context):
    while True:
        yield b"x"
        await asyncio.sleep(0.001)

class Handlers(grpc.GenericRpcHandler):
    def service(self, details):
        return grpc.unary_stream_rpc_method_handler(
            endless, request_deserializer=bytes, response_serializer=bytes
        )

async def main():
    loop_errors = []
    asyncio.get_running_loop().set_exception_handler(
        lambda loop, context: loop_errors.append(context.get("message"))
    )
    server = grpc.aio.server(interceptors=[ServerObservabilityInterceptor()])
    server.add_generic_rpc_handlers((Handlers(),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    for _ in range(10):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            method = channel.unary_stream(
                "/t.Stream/Endless", request_serializer=bytes, response_deserializer=bytes
            )
            calls = [method(b"") for _ in range(20)]
            for call in calls:
                await call.read()
            for call in calls:
                call.cancel()
        await asyncio.sleep(0.05)
        gc.collect()
        await asyncio.sleep(0.05)
    await server.stop(None)
    print("loop errors:", loop_errors)

asyncio.run(main())
"""


def test_a_stream_left_by_its_caller_is_finalised_without_crash_or_error() -> None:
    done = subprocess.run(
        [sys.executable, "-X", "faulthandler", "-c", SCENARIO],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "loop errors: []" in done.stdout, done.stdout[-3000:]
    assert "code=CANCELLED" in done.stdout + done.stderr  # each left call is still logged
