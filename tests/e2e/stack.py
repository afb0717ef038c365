"""Real service processes for end-to-end tests: start, wait until SERVING, stop, read logs.

Each service is ``python -m opsconductor.<name>`` on an ephemeral port (reported through its
port file), logging JSON to a file the tests can scan (e.g. for leaked secrets).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from opsconductor.client.tls import ClientTls, open_channel

#: Signs every e2e token (HS256 needs >= 32 bytes).
HS256_KEY = "e2e-signing-key-0123456789abcdef-0123456789"
AUDIENCE = "opsconductor-execution"


@dataclass
class ServiceProcess:
    name: str
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path
    #: The ``OPSC_*`` variables it was started with on top of :func:`service_env`'s.
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self, grace_s: float = 10.0) -> int:
        """SIGTERM, then SIGKILL after ``grace_s``; returns the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        return self.process.returncode

    async def stop_async(self, grace_s: float = 10.0) -> int:
        """:meth:`stop`, waiting in a thread: the event loop keeps serving whatever the
        service's shutdown still talks to (a test's proxy, identity provider or collector);
        blocked, it would hold the shutdown until ``grace_s`` ran out and SIGKILL came."""
        return await asyncio.to_thread(self.stop, grace_s)


@dataclass
class Stack:
    """The services of one e2e module and where their logs are."""

    dsn: str
    log_dir: Path
    services: dict[str, ServiceProcess] = field(default_factory=dict)

    def address(self, name: str) -> str:
        return self.services[name].address

    def http_port(self, name: str) -> int:
        """The HTTP port a service wrote to ``<name>.http-port`` (the progress service)."""
        return int((self.log_dir / f"{name}.http-port").read_text())

    async def stop(self) -> None:
        """Stop every service, the last started first (dependents before what they call)."""
        for service in reversed(list(self.services.values())):
            await service.stop_async()

    def logs(self) -> str:
        """Everything every service has logged so far."""
        return "".join(p.read_text(errors="replace") for p in sorted(self.log_dir.glob("*.log")))


def service_env(dsn: str, extra: dict[str, str]) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("OPSC_") and k not in {"DATABASE_URL", "REDIS_URL"}
    }
    env.update(
        {
            "OPSC_DATABASE_URL": dsn,
            "OPSC_JWT_HS256_KEY": HS256_KEY,
            "OPSC_JWT_AUDIENCE": AUDIENCE,
            "OPSC_GRPC_PORT": "0",
            "OPSC_LOG_JSON": "true",
            "OPSC_LOG_LEVEL": "INFO",
            "OPSC_SHUTDOWN_GRACE_S": "5",
        }
    )
    env.update(extra)
    return env


async def wait_serving(
    address: str,
    process: subprocess.Popen[bytes],
    within_s: float,
    *,
    tls: ClientTls | None = None,
) -> None:
    """Poll the gRPC health check until SERVING (fails early if the process died).

    ``tls``: dial the service over TLS (a service started with ``OPSC_TLS_*``).
    """
    deadline = time.monotonic() + within_s
    async with open_channel(address, tls) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"service at {address} exited with {process.returncode}")
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"service at {address} not SERVING within {within_s} s")
            await asyncio.sleep(0.05)


async def start_service(
    name: str,
    stack: Stack,
    extra_env: dict[str, str],
    within_s: float = 30.0,
    *,
    module: str | None = None,
    tls: ClientTls | None = None,
) -> ServiceProcess:
    """Start ``python -m opsconductor.<module>`` (default: ``name``) as ``stack.services[name]``
    and wait until it reports SERVING.

    ``name`` also names its port file and log, so several processes of one module coexist.
    """
    port_file = stack.log_dir / f"{name}.port"
    port_file.unlink(missing_ok=True)
    log_path = stack.log_dir / f"{name}.log"
    env = service_env(stack.dsn, {**extra_env, "OPSC_PORT_FILE": str(port_file)})
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", f"opsconductor.{module or name}"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    deadline = time.monotonic() + within_s
    while not port_file.exists() or not port_file.read_text().strip():
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with {process.returncode}: see {log_path}")
        if time.monotonic() > deadline:
            process.kill()
            process.wait(5)  # reaped: an unreaped Popen warns later, failing some other test
            raise TimeoutError(f"{name} did not bind a port within {within_s} s")
        await asyncio.sleep(0.05)
    service = ServiceProcess(name, process, int(port_file.read_text()), log_path, dict(extra_env))
    try:
        await wait_serving(service.address, process, deadline - time.monotonic(), tls=tls)
    except BaseException:
        await service.stop_async(grace_s=0)
        raise
    stack.services[name] = service
    return service


async def start_worker(
    stack: Stack, name: str, env: dict[str, str] | None = None, within_s: float = 30.0
) -> ServiceProcess:
    """Start one more worker process, ``stack.services[name]``, next to the stack's ``worker``.

    It gets the ``worker`` service's environment (database, Redis, queue prefix, secrets) with
    ``OPSC_WORKER_ID=name`` and ``env`` on top; its log is ``<name>.log``.
    """
    if name in stack.services and stack.services[name].process.poll() is None:
        raise ValueError(f"a service named {name!r} is already running")
    base = stack.services["worker"].extra_env
    return await start_service(
        name, stack, {**base, "OPSC_WORKER_ID": name, **(env or {})}, within_s, module="worker"
    )
