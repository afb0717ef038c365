"""gRPC server bootstrap shared by every service.

``build_server`` makes a ``grpc.aio`` server with the observability interceptor, the service's
own servicers, the standard health service (``grpc.health.v1``) and reflection, bound to
``grpc_host:grpc_port`` (port 0 → an ephemeral port, reported in the log and in ``port_file``).
``serve`` runs it for a process's lifetime:

1. start listening with every health status ``NOT_SERVING``;
2. run the ``on_startup`` hooks (open the database pool, ...);
3. health ``SERVING`` for ``""`` and each registered service;
4. on SIGTERM/SIGINT: health ``NOT_SERVING``, ``await server.stop(grace)`` (in-flight RPCs get
   ``shutdown_grace_s`` to finish), the ``on_shutdown`` hooks in reverse order, return.

TLS/mTLS (``OPSC_TLS_*``, off by default) is :mod:`opsconductor.rpc.tls`'s; with
``health_port`` set, a second, plaintext listener serves only the health service (for probes
that cannot speak TLS).

``run_server`` is the synchronous entry point each service's ``__main__`` calls; it turns a crash
into a logged (hence masked) error and exit status 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

import grpc
import grpc.aio
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]
from grpc_reflection.v1alpha import reflection
from pydantic import ValidationError

from opsconductor.common.egress import reserve_local_ports
from opsconductor.common.tracing import configure_tracing
from opsconductor.rpc.interceptors import ServerObservabilityInterceptor
from opsconductor.rpc.tls import server_credentials

log = structlog.get_logger(__name__)

Register = Callable[[grpc.aio.Server], Sequence[str]]
"""Adds a service's servicers to the server; returns their full names (for health, reflection)."""

Hook = Callable[[], Awaitable[None]]
"""A start-up or shutdown step (open or close a pool, start or stop a consumer)."""

SettingsT = TypeVar("SettingsT")

#: Largest gRPC message a server accepts or sends (a plan is at most 512 KiB as JSON; its
#: protobuf form stays well below this). Larger messages get RESOURCE_EXHAUSTED before decoding.
DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024
#: RPCs a server serves at once; more get RESOURCE_EXHAUSTED at once, never a hang.
DEFAULT_MAX_CONCURRENT_RPCS = 256

HEALTH_SERVICE_NAME: str = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class ServerSettings(Protocol):
    """What the bootstrap reads from a service's settings (``ServiceSettings`` provides it)."""

    @property
    def service_name(self) -> str: ...
    @property
    def grpc_host(self) -> str: ...
    @property
    def grpc_port(self) -> int: ...
    @property
    def metrics_port(self) -> int | None: ...
    @property
    def shutdown_grace_s(self) -> float: ...
    @property
    def otel_enabled(self) -> bool: ...
    @property
    def port_file(self) -> Path | None: ...


class RpcServer:
    """A built, bound, not yet started server; health stays ``NOT_SERVING`` until told."""

    def __init__(
        self,
        server: grpc.aio.Server,
        health: Any,
        service_names: Sequence[str],
        host: str,
        port: int,
        health_listener: tuple[grpc.aio.Server, int] | None = None,
    ) -> None:
        self.server = server
        #: The plaintext health-only listener (``health_port``) and its bound port, if any.
        self.health_server: grpc.aio.Server | None = None
        self.health_port: int | None = None
        if health_listener is not None:
            self.health_server, self.health_port = health_listener
        self.service_names = tuple(service_names)
        self.host = host
        self.port = port
        self._health = health

    @property
    def address(self) -> str:
        """``host:port`` clients dial (IPv6 hosts bracketed)."""
        return f"{_bracket(self.host)}:{self.port}"

    async def start(self) -> None:
        """Start accepting RPCs, reporting ``NOT_SERVING`` until :meth:`mark_serving`."""
        # The aio HealthServicer starts with "" SERVING: nothing is ready yet, so say so.
        for name in ("", *self.service_names):
            await self._health.set(name, _NOT_SERVING)
        await self.server.start()
        if self.health_server is not None:
            await self.health_server.start()

    async def mark_serving(self) -> None:
        """Report ``SERVING`` for the whole server and each registered service."""
        for name in ("", *self.service_names):
            await self._health.set(name, _SERVING)

    async def stop(self, grace: float | None) -> None:
        """Report ``NOT_SERVING`` for good, then stop, letting in-flight RPCs run ``grace`` s."""
        await self._health.enter_graceful_shutdown()
        if self.health_server is not None:
            await self.health_server.stop(None)
        await self.server.stop(grace)


def message_size_options(settings: object) -> list[tuple[str, int]]:
    """gRPC channel/server options bounding messages both ways (refused before decoding)."""
    limit = int(getattr(settings, "grpc_max_message_bytes", DEFAULT_MAX_MESSAGE_BYTES))
    return [("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)]


def build_server(settings: ServerSettings, register: Register) -> RpcServer:
    """Create the ``grpc.aio`` server of a service, bound but not started.

    Must be called with an event loop running (``grpc.aio`` binds the server to it).
    """
    if settings.otel_enabled:
        configure_tracing(
            str(getattr(settings, "service_name", "service")),
            exporter=str(getattr(settings, "otel_exporter", "none")),
            endpoint=getattr(settings, "otel_endpoint", None),
            file=getattr(settings, "otel_file", None),
        )
    # Looked up at call time: the OpenTelemetry instrumentor replaces grpc.aio.server.
    server = grpc.aio.server(
        interceptors=[ServerObservabilityInterceptor()],
        # grpc enables SO_REUSEPORT by default: a second instance on the same port would then
        # share its traffic silently instead of failing to start.
        options=[("grpc.so_reuseport", 0), *message_size_options(settings)],
        # Beyond this many RPCs in flight grpc answers RESOURCE_EXHAUSTED at once, so a flood
        # is refused instead of queueing every later caller behind it.
        maximum_concurrent_rpcs=getattr(
            settings, "grpc_max_concurrent_rpcs", DEFAULT_MAX_CONCURRENT_RPCS
        ),
    )
    service_names = list(register(server))
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        [*service_names, HEALTH_SERVICE_NAME, reflection.SERVICE_NAME], server
    )
    requested = f"{_bracket(settings.grpc_host)}:{settings.grpc_port}"
    tls = server_credentials(settings)
    if tls is None:
        port = server.add_insecure_port(requested)
    else:
        port = server.add_secure_port(requested, tls[0])
    if port == 0:
        raise OSError(f"could not bind gRPC server to {requested}")
    health_listener = _health_listener(settings, health)
    return RpcServer(server, health, service_names, settings.grpc_host, port, health_listener)


def _health_listener(settings: ServerSettings, health: Any) -> tuple[grpc.aio.Server, int] | None:
    """A plaintext server with only the health service, on ``health_port`` (if configured)."""
    health_port = getattr(settings, "health_port", None)
    if health_port is None:
        return None
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    requested = f"{_bracket(settings.grpc_host)}:{health_port}"
    port = server.add_insecure_port(requested)
    if port == 0:
        raise OSError(f"could not bind the health port to {requested}")
    return server, port


async def serve(
    settings: ServerSettings,
    register: Register,
    *,
    on_startup: Sequence[Hook] = (),
    on_stopping: Sequence[Hook] = (),
    on_shutdown: Sequence[Hook] = (),
) -> None:
    """Run the service until SIGTERM/SIGINT, then shut it down gracefully (see module doc).

    ``on_stopping`` hooks run as soon as the stop is requested, alongside the drain of in-flight
    RPCs (e.g. a queue consumer stops taking jobs at once); ``on_shutdown`` hooks after it.
    """
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    signals = (signal.SIGTERM, signal.SIGINT)
    rpc = build_server(settings, register)
    metrics = _start_metrics_server(settings)
    for signum in signals:
        loop.add_signal_handler(signum, stop_requested.set)
    try:
        await rpc.start()
        # No http step may reach this process's own listeners (docs/security.md, egress).
        reserve_local_ports(
            [rpc.port, rpc.health_port, None if metrics is None else metrics.server_port]
        )
        _write_port_file(settings.port_file, rpc.port)
        log.info(
            "server_started",
            service=settings.service_name,
            address=rpc.address,
            port=rpc.port,
            services=list(rpc.service_names),
            event_loop=type(asyncio.get_running_loop()).__module__.partition(".")[0],
        )
        if await _run_startup(on_startup, stop_requested):
            await rpc.mark_serving()
            log.info("server_serving", service=settings.service_name, address=rpc.address)
            await stop_requested.wait()
        log.info(
            "server_stopping", service=settings.service_name, grace_s=settings.shutdown_grace_s
        )
    finally:
        await asyncio.gather(rpc.stop(settings.shutdown_grace_s), _run_shutdown(on_stopping))
        await _run_shutdown(on_shutdown)
        if metrics is not None:
            metrics.shutdown()
            metrics.server_close()
        _remove_port_file(settings.port_file)
        for signum in signals:
            loop.remove_signal_handler(signum)
        log.info("server_stopped", service=settings.service_name)


def load_settings(factory: Callable[[], SettingsT]) -> SettingsT:
    """Build a service's settings; on invalid configuration, name the problems and exit 2.

    pydantic's own error text quotes the offending input, which may be a DSN or a key: only the
    field and the problem are printed.
    """
    try:
        return factory()
    except ValidationError as exc:
        for error in exc.errors(include_input=False, include_url=False):
            where = ".".join(str(part) for part in error["loc"]) or "settings"
            print(f"configuration error: {where}: {error['msg']}", file=sys.stderr)
        raise SystemExit(2) from None


def run_server(
    settings: ServerSettings,
    register: Register,
    *,
    on_startup: Sequence[Hook] = (),
    on_stopping: Sequence[Hook] = (),
    on_shutdown: Sequence[Hook] = (),
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None,
) -> int:
    """Blocking entry point for a service's ``__main__``; returns the process exit status.

    ``loop_factory`` makes the event loop (e.g. ``uvloop.new_event_loop``); None: asyncio's own.
    """
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(
                serve(
                    settings,
                    register,
                    on_startup=on_startup,
                    on_stopping=on_stopping,
                    on_shutdown=on_shutdown,
                )
            )
    except Exception:
        # Logged rather than left to the interpreter so the traceback passes through the masker.
        log.exception("server_crashed", service=settings.service_name)
        return 1
    return 0


async def _run_startup(hooks: Sequence[Hook], stop_requested: asyncio.Event) -> bool:
    """Run the start-up hooks in order; False if a stop signal arrived first."""

    async def run_all() -> None:
        for hook in hooks:
            await hook()

    startup = asyncio.ensure_future(run_all())
    stopper = asyncio.ensure_future(stop_requested.wait())
    try:
        await asyncio.wait({startup, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
    if startup.done():
        startup.result()  # a failed hook propagates: the service cannot serve
        return True
    startup.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await startup
    log.info("startup_interrupted")
    return False


async def _run_shutdown(hooks: Sequence[Hook]) -> None:
    # Reverse order (last opened, first closed); one failing hook must not keep others open.
    for hook in reversed(hooks):
        try:
            await hook()
        except Exception:
            log.exception("shutdown_hook_failed", hook=getattr(hook, "__qualname__", repr(hook)))


def _start_metrics_server(settings: ServerSettings) -> Any:
    if settings.metrics_port is None or settings.metrics_port < 0:
        return None
    from prometheus_client import start_http_server

    server, _thread = start_http_server(settings.metrics_port, addr=settings.grpc_host)
    log.info("metrics_server_started", port=server.server_port)
    return server


def _write_port_file(path: Path | None, port: int) -> None:
    if path is None:
        return
    # Written atomically so a supervisor polling for it never reads half a number.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(f"{port}\n", encoding="ascii")
    tmp.replace(path)


def _remove_port_file(path: Path | None) -> None:
    if path is not None:
        path.unlink(missing_ok=True)


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
