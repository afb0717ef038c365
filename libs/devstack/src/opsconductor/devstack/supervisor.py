"""The ``make run`` supervisor: dependencies, migrations, four services, health, clean stop.

1. Postgres: ``DATABASE_URL`` if set, else an embedded server under ``<devstack_dir>/pg`` with a
   database ``opsconductor``; Redis: ``REDIS_URL`` if set, else an embedded one.
2. Migrations are applied (``migrate_up``: idempotent, under an advisory lock).
3. api, worker, approvals and progress start as subprocesses, each in a process group of its own
   (a Ctrl-C at the terminal reaches only the supervisor, which then stops things in order).
4. Each one's gRPC health check is polled until ``SERVING``; a table of the services follows.
5. SIGTERM/SIGINT: SIGTERM to every service's process group, SIGKILL after the grace period,
   then the embedded servers stop; exit 0 with nothing left running. If a service dies (or the
   stack does not become ready in time), that is reported and everything is shut down: exit 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TextIO
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import grpc
import grpc.aio
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc

from opsconductor.common.storage.migrate import migrate_up
from opsconductor.devstack.config import EMBEDDED_DATABASE, DevstackSettings
from opsconductor.devstack.dev_identity import (
    DEV_PRINCIPAL,
    DEV_TENANT,
    dev_token,
    seed_dev_tenant,
    signing_key,
)
from opsconductor.devstack.embedded import start_postgres, start_redis

log = structlog.get_logger(__name__)

_HEALTH_POLL_S = 0.1
_HEALTH_RPC_TIMEOUT_S = 1.0
# A channel that failed to connect backs off up to 2 min by default; a service that comes up
# a second later must be seen at once.
_CHANNEL_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),
)


@dataclass(frozen=True)
class ServiceSpec:
    """How to start one service: its module, gRPC port and environment overrides."""

    name: str
    host: str
    port: int
    env: dict[str, str]
    note: str = ""
    #: Module to run; default ``opsconductor.<name>``.
    module_name: str = ""
    #: Extra command-line arguments.
    args: tuple[str, ...] = ()

    @property
    def module(self) -> str:
        return self.module_name or f"opsconductor.{self.name}"

    @property
    def has_health(self) -> bool:
        """gRPC services report health; helper processes (the reaper) only have to stay up."""
        return self.port > 0

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass
class RunningService:
    """A started service process and what its health check last said."""

    spec: ServiceSpec
    process: asyncio.subprocess.Process
    status: str = "STARTING"


@dataclass
class _Dependency:
    name: str
    where: str
    pid: int | None
    stop: Callable[[], None] | None = None


class Supervisor:
    """Runs the dev stack until told to stop; :meth:`run` returns the exit status."""

    def __init__(self, settings: DevstackSettings, out: TextIO | None = None) -> None:
        self.settings = settings
        self.out = out if out is not None else sys.stdout
        self.services: list[RunningService] = []
        self._dependencies: list[_Dependency] = []
        self._stop_requested = asyncio.Event()
        self._service_died = asyncio.Event()
        self._stopping = False
        self._monitors: list[asyncio.Task[None]] = []
        self._jwt_key: str | None = None

    def request_stop(self) -> None:
        """Ask the stack to shut down (signal handlers call this)."""
        self._stop_requested.set()

    async def run(self) -> int:
        """Start everything, wait for a stop request or a failure, stop everything."""
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.request_stop)
        started = time.monotonic()
        try:
            return await self._run(started)
        finally:
            await self._stop_services()
            await self._stop_dependencies()
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)
            log.info("devstack_stopped")

    async def _run(self, started: float) -> int:
        database_url = await self._database()
        if self._stop_requested.is_set():
            return 0
        redis_url = await self._redis()
        if self._stop_requested.is_set():
            return 0
        applied = await migrate_up(database_url)
        log.info("migrations_applied", versions=applied)
        await seed_dev_tenant(database_url)
        self._jwt_key = signing_key(self.settings.devstack_dir)
        for spec in self.service_specs(database_url, redis_url):
            await self._spawn(spec)
        outcome = await self._first_of(
            ready=self._all_serving(), within_s=self.settings.devstack_ready_s
        )
        if outcome != "ready":
            return self._report_failed_start(outcome)
        self._print_table(time.monotonic() - started)
        self._print_identity()
        outcome = await self._first_of(ready=None, within_s=None)
        if outcome == "died":
            self._report_death()
            return 1
        return 0

    # ---------------------------------------------------------------------------------------------
    # Dependencies

    async def _database(self) -> str:
        if self.settings.database_url is not None:
            self._dependencies.append(_Dependency("postgres", "external (DATABASE_URL)", None))
            return self.settings.database_url.get_secret_value()
        data_dir = self.settings.devstack_dir / "pg"
        server = await asyncio.to_thread(start_postgres, data_dir)
        self._dependencies.append(
            _Dependency("postgres", f"embedded {data_dir}", server.pid, server.stop)
        )
        await _ensure_database(server.dsn, EMBEDDED_DATABASE)
        return _with_database(server.dsn, EMBEDDED_DATABASE)

    async def _redis(self) -> str:
        if self.settings.redis_url is not None:
            self._dependencies.append(_Dependency("redis", "external (REDIS_URL)", None))
            return self.settings.redis_url.get_secret_value()
        server = await asyncio.to_thread(start_redis, self.settings.devstack_dir / "redis")
        self._dependencies.append(
            _Dependency("redis", f"embedded {server.url}", server.pid, server.stop)
        )
        return server.url

    async def _stop_dependencies(self) -> None:
        # Reverse start order: Redis, then Postgres.
        for dependency in reversed(self._dependencies):
            if dependency.stop is not None:
                await asyncio.to_thread(dependency.stop)
        self._dependencies.clear()

    # ---------------------------------------------------------------------------------------------
    # Services

    def service_specs(self, database_url: str, redis_url: str) -> list[ServiceSpec]:
        """The four services with their ports and environment (documented in ``config``)."""
        s = self.settings
        host = s.devstack_host
        common = {
            "OPSC_DATABASE_URL": database_url,
            "DATABASE_URL": database_url,
            "OPSC_REDIS_URL": redis_url,
            "REDIS_URL": redis_url,
            "OPSC_GRPC_HOST": host,
            "OPSC_WORKER_TARGET": f"{host}:{s.worker_port}",
            "OPSC_LOG_JSON": "true" if s.log_json else "false",
            "OPSC_JWT_HS256_KEY": self._jwt_key or signing_key(s.devstack_dir),
            "PYTHONUNBUFFERED": "1",
        }

        def spec(name: str, port: int, metrics: int, note: str = "", **extra: str) -> ServiceSpec:
            env = {
                **common,
                "OPSC_GRPC_PORT": str(port),
                "OPSC_METRICS_PORT": str(metrics),
                **extra,
            }
            return ServiceSpec(name, host, port, env, note)

        return [
            spec("api", s.api_port, s.api_metrics_port),
            spec("worker", s.worker_port, s.worker_metrics_port),
            spec("approvals", s.approvals_port, s.approvals_metrics_port),
            spec(
                "progress",
                s.progress_port,
                s.progress_metrics_port,
                note=f"HTTP {host}:{s.progress_http_port}",
                OPSC_HTTP_PORT=str(s.progress_http_port),
            ),
            # The reaper (a Kubernetes CronJob in production) loops here every 60 s.
            ServiceSpec(
                "reaper",
                host,
                0,
                {**common, "OPSC_SERVICE_NAME": "reaper"},
                note="every 60 s",
                module_name="opsconductor.worker.reaper",
                args=("--interval", "60"),
            ),
        ]

    async def _spawn(self, spec: ServiceSpec) -> None:
        # The services inherit this environment (log level, JWT keys, ...) plus their overrides.
        env = {**os.environ, **spec.env}
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            spec.module,
            *spec.args,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            start_new_session=True,
        )
        service = RunningService(spec, process)
        self.services.append(service)
        self._monitors.append(asyncio.create_task(self._watch(service)))
        log.info("service_started", service=spec.name, pid=process.pid, address=spec.address)

    async def _watch(self, service: RunningService) -> None:
        code = await service.process.wait()
        if not self._stopping:
            service.status = f"EXITED({code})"
            log.error("service_died", service=service.spec.name, exit_code=code)
            self._service_died.set()

    async def _all_serving(self) -> None:
        await asyncio.gather(*(self._poll_health(s) for s in self.services if s.spec.has_health))
        for service in self.services:
            if not service.spec.has_health:
                service.status = "RUNNING"

    async def _poll_health(self, service: RunningService) -> None:
        request = health_pb2.HealthCheckRequest(service="")
        async with grpc.aio.insecure_channel(
            service.spec.address, options=_CHANNEL_OPTIONS
        ) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                try:
                    response = await stub.Check(request, timeout=_HEALTH_RPC_TIMEOUT_S)
                except grpc.aio.AioRpcError as exc:
                    service.status = exc.code().name
                else:
                    service.status = health_pb2.HealthCheckResponse.ServingStatus.Name(
                        response.status
                    )
                    if response.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                await asyncio.sleep(_HEALTH_POLL_S)

    async def _stop_services(self) -> None:
        self._stopping = True
        running = [s for s in self.services if s.process.returncode is None]
        for service in running:
            _signal_group(service.process.pid, signal.SIGTERM)
        if running:
            waits = [service.process.wait() for service in running]
            try:
                await asyncio.wait_for(asyncio.gather(*waits), self.settings.devstack_stop_grace_s)
            except TimeoutError:
                for service in running:
                    if service.process.returncode is None:
                        log.warning("service_killed", service=service.spec.name)
                        _signal_group(service.process.pid, signal.SIGKILL)
                await asyncio.gather(*(service.process.wait() for service in running))
        for service in self.services:
            # Anything a service started in its group and left behind goes too.
            _signal_group(service.process.pid, signal.SIGKILL)
            log.info(
                "service_stopped", service=service.spec.name, exit_code=service.process.returncode
            )
        for monitor in self._monitors:
            monitor.cancel()
        await asyncio.gather(*self._monitors, return_exceptions=True)
        self._monitors.clear()

    # ---------------------------------------------------------------------------------------------
    # Waiting and reporting

    async def _first_of(self, *, ready: Awaitable[None] | None, within_s: float | None) -> str:
        """Wait for ``ready``, a stop request or a death: "ready", "stop", "died" or "timeout"."""
        tasks: dict[asyncio.Future[Any], str] = {
            asyncio.ensure_future(self._stop_requested.wait()): "stop",
            asyncio.ensure_future(self._service_died.wait()): "died",
        }
        if ready is not None:
            tasks[asyncio.ensure_future(ready)] = "ready"
        try:
            done, _ = await asyncio.wait(
                tasks, timeout=within_s, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        # A death outranks readiness seen in the same instant; a stop request outranks both.
        outcomes = {tasks[task] for task in done}
        for outcome in ("stop", "died", "ready"):
            if outcome in outcomes:
                return outcome
        return "timeout"

    def _report_failed_start(self, outcome: str) -> int:
        if outcome == "stop":
            return 0
        if outcome == "died":
            self._report_death()
        else:
            print(
                f"The dev stack did not reach SERVING within {self.settings.devstack_ready_s:g} s:",
                file=self.out,
            )
            self._print_rows()
        self.out.flush()
        return 1

    def _report_death(self) -> None:
        dead = [s.spec.name for s in self.services if s.process.returncode is not None]
        print(f"Service(s) died: {', '.join(dead)}; stopping the dev stack.", file=self.out)
        self._print_rows()
        self.out.flush()

    def _print_table(self, elapsed: float) -> None:
        print(
            f"OpsConductor dev stack: all {sum(s.spec.has_health for s in self.services)} "
            f"services SERVING in {elapsed:.2f} s (and the reaper loop)",
            file=self.out,
        )
        self._print_rows()
        print("Press Ctrl-C to stop.", file=self.out)
        self.out.flush()

    def _print_identity(self) -> None:
        token = dev_token(self._jwt_key or signing_key(self.settings.devstack_dir))
        print(
            f"\ntenant {DEV_TENANT!r}, principal {DEV_PRINCIPAL!r} (admin), token valid 12 h:\n"
            f"  export OPSC_TOKEN={token}\n"
            f'  grpcurl -plaintext -H "authorization: Bearer $OPSC_TOKEN" '
            f'-d \'{{"tenant_id": "{DEV_TENANT}"}}\' '
            f"{self.settings.devstack_host}:{self.settings.api_port} "
            "opsconductor.execution.v1.ExecutionService/ListExecutions\n",
            file=self.out,
            flush=True,
        )

    def _print_rows(self) -> None:
        rows = [("SERVICE", "ADDRESS", "STATUS", "PID", "")]
        for s in self.services:
            address = s.spec.address if s.spec.has_health else "-"
            rows.append((s.spec.name, address, s.status, str(s.process.pid), s.spec.note))
        for d in self._dependencies:
            rows.append(
                (d.name, d.where, "RUNNING" if d.pid else "EXTERNAL", str(d.pid or "-"), "")
            )
        widths = [max(len(row[i]) for row in rows) for i in range(4)]
        for row in rows:
            cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
            print("  " + "  ".join([*cells, row[4]]).rstrip(), file=self.out)


def _signal_group(pgid: int, signum: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


def _with_database(dsn: str, database: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit((parts.scheme, parts.netloc, f"/{database}", parts.query, parts.fragment))


async def _ensure_database(admin_dsn: str, database: str) -> None:
    conn: asyncpg.Connection = await asyncpg.connect(admin_dsn)
    try:
        exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", database)
        if not exists:
            with contextlib.suppress(asyncpg.DuplicateDatabaseError):
                await conn.execute(f'CREATE DATABASE "{database}"')
            log.info("database_created", database=database)
    finally:
        await conn.close()


def run_devstack(settings: DevstackSettings) -> int:
    """Run the dev stack in the foreground; returns the process exit status."""
    settings.devstack_dir.mkdir(parents=True, exist_ok=True)
    try:
        return asyncio.run(Supervisor(settings).run())
    except Exception:
        # Logged (hence masked: a driver error may quote a DSN) rather than left to the
        # interpreter; everything started was stopped on the way out of Supervisor.run.
        log.exception("devstack_failed")
        return 1


__all__ = ["RunningService", "ServiceSpec", "Supervisor", "run_devstack"]
