"""The ``make run`` supervisor: dependencies, migrations, the services, health, restarts, stop.

1. Postgres: ``DATABASE_URL`` if set, else an embedded server under ``<devstack_dir>/pg`` with a
   database ``opsconductor``; Redis: ``REDIS_URL`` if set, else an embedded one.
2. Migrations are applied (``migrate_up``: idempotent, under an advisory lock).
3. api, ``--workers N`` workers, approvals, progress and the reaper loop start as subprocesses,
   each in a process group of its own (a Ctrl-C at the terminal reaches only the supervisor,
   which then stops things in order). A port set to 0 is an ephemeral port, chosen once, so a
   restarted service comes back where its clients expect it.
4. Each one's gRPC health check is polled until ``SERVING``; a table of the services follows.
   A service that cannot start (it dies, or the stack is not ready in time) is reported and
   everything is shut down: exit 1.
5. Once the stack has served, a service that exits without being asked to is started again,
   like a process manager would: after a back-off (:class:`~.services.RestartBackoff`), logged
   (``service_exited``, ``service_restarted``), with its restart count in the table, which is
   printed again when it serves again. So an operator can ``kill -9`` a worker by hand and
   watch its job complete on another one.
6. SIGTERM/SIGINT: SIGTERM (and SIGCONT, for a paused one) to every service's process group,
   SIGKILL after the grace period, then the embedded servers stop; exit 0, nothing left running.

:class:`Supervisor` is also the launcher of the chaos soak (``make chaos``), which drives it
through :meth:`Supervisor.start`, :meth:`Supervisor.service` and :meth:`Supervisor.stop`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TextIO
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import grpc
import grpc.aio
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc

from opsconductor.common.errors import OpsConductorError
from opsconductor.devstack.config import EMBEDDED_DATABASE, DevstackSettings
from opsconductor.devstack.dev_identity import (
    DEV_PRINCIPAL,
    DEV_TENANT,
    dev_secrets,
    dev_token,
    seed_dev_tenant,
    signing_key,
)
from opsconductor.devstack.embedded import start_postgres, start_redis
from opsconductor.devstack.queries import query
from opsconductor.devstack.services import (
    RestartBackoff,
    RunningService,
    ServiceSpec,
    free_port,
    signal_group,
    spawn_service,
)
from opsconductor.lifecycle.storage.migrate import migrate_up

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

_DATABASE_EXISTS = query("database_exists")


class StackStartError(OpsConductorError):
    """The dev stack did not come up (a service died or was not SERVING in time)."""

    reason = "DEVSTACK_START_FAILED"


@dataclass
class _Dependency:
    name: str
    where: str
    pid: int | None
    stop: Callable[[], None] | None = None


class Supervisor:
    """Runs the dev stack; :meth:`run` (``make run``) returns the exit status.

    ``extra_env`` is added to every service's environment (the chaos soak sets short leases
    and its secrets that way); ``backoff`` is the restart rule.
    """

    def __init__(
        self,
        settings: DevstackSettings,
        out: TextIO | None = None,
        *,
        extra_env: Mapping[str, str] | None = None,
        backoff: RestartBackoff | None = None,
    ) -> None:
        self.settings = settings
        self.out = out if out is not None else sys.stdout
        self.services: list[RunningService] = []
        #: Postgres and Redis URLs the services use (set by :meth:`start`).
        self.database_url: str | None = None
        self.redis_url: str | None = None
        self._extra_env = dict(extra_env or {})
        self._backoff = backoff or RestartBackoff()
        self._dependencies: list[_Dependency] = []
        self._stop_requested = asyncio.Event()
        self._service_died = asyncio.Event()
        self._serving = False
        self._stopping = False
        self._monitors: list[asyncio.Task[None]] = []
        self._jwt_key: str | None = None

    def request_stop(self) -> None:
        """Ask the stack to shut down (signal handlers call this)."""
        self._stop_requested.set()

    @property
    def jwt_key(self) -> str:
        """The HS256 key the services verify tokens with."""
        return self._jwt_key or signing_key(self.settings.devstack_dir)

    def service(self, name: str) -> RunningService:
        """The running service called ``name`` (``api``, ``worker``, ``worker-2``, ...)."""
        for service in self.services:
            if service.spec.name == name:
                return service
        raise KeyError(name)

    async def run(self) -> int:
        """Start everything, supervise until a stop request, stop everything."""
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.request_stop)
        try:
            try:
                await self.start()
            except StackStartError:
                return 1
            if self._stop_requested.is_set():
                return 0
            self._print_identity()
            await self._stop_requested.wait()
            return 0
        finally:
            await self.stop()
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)
            log.info("devstack_stopped")

    async def start(self) -> None:
        """Dependencies, migrations, every service SERVING; then deaths mean restarts.

        Raises :class:`StackStartError` (after printing why) if the stack does not come up;
        returns early, with nothing started, if a stop was requested meanwhile. The caller
        calls :meth:`stop` in every case.
        """
        started = time.monotonic()
        database_url = await self._database()
        if self._stop_requested.is_set():
            return
        redis_url = await self._redis()
        if self._stop_requested.is_set():
            return
        applied = await migrate_up(database_url)
        log.info("migrations_applied", versions=applied)
        await seed_dev_tenant(database_url)
        self.database_url, self.redis_url = database_url, redis_url
        self._jwt_key = signing_key(self.settings.devstack_dir)
        for spec in self.service_specs(database_url, redis_url):
            await self._spawn(spec)
        outcome = await self._first_of(
            ready=self._all_serving(), within_s=self.settings.devstack_ready_s
        )
        if outcome == "stop":
            return
        if outcome != "ready":
            self._report_failed_start(outcome)
            raise StackStartError("the dev stack did not start")
        self._serving = True
        self._print_table(time.monotonic() - started)

    async def wait_serving(self, name: str, within_s: float) -> None:
        """Wait until service ``name`` (its current process) reports SERVING again."""
        service = self.service(name)
        deadline = time.monotonic() + within_s
        while service.status not in ("SERVING", "RUNNING") or not service.alive:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} not serving within {within_s:g} s ({service.status})")
            await asyncio.sleep(_HEALTH_POLL_S)

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
        """The services with their ports and environment (documented in ``config``).

        Ports given as 0 become ephemeral ports here, once: restarts keep them.
        """
        s = self.settings
        host = s.devstack_host

        def port(value: int) -> int:
            return value or free_port(host)

        worker_ports = [port(s.worker_port), *(free_port(host) for _ in range(s.workers - 1))]
        common = {
            "OPSC_DATABASE_URL": database_url,
            "DATABASE_URL": database_url,
            "OPSC_REDIS_URL": redis_url,
            "REDIS_URL": redis_url,
            "OPSC_GRPC_HOST": host,
            "OPSC_WORKER_TARGET": worker_target(host, worker_ports),
            "OPSC_LOG_JSON": "true" if s.log_json else "false",
            "OPSC_JWT_HS256_KEY": self.jwt_key,
            "PYTHONUNBUFFERED": "1",
            # The dev tenant's secret and catalogue, unless the developer brings their own.
            **{
                name: value
                for name, value in dev_secrets(s.devstack_dir).items()
                if name not in os.environ
            },
            **self._extra_env,
        }

        def spec(
            name: str, grpc_port: int, metrics: int, note: str = "", **extra: str
        ) -> ServiceSpec:
            env = {
                **common,
                "OPSC_GRPC_PORT": str(grpc_port),
                "OPSC_METRICS_PORT": str(metrics),
                **extra,
            }
            return ServiceSpec(name, host, grpc_port, env, note)

        workers = [
            # Extra workers' metrics go to ephemeral ports (OPSC_METRICS_PORT=0).
            ServiceSpec(
                "worker" if index == 0 else f"worker-{index + 1}",
                host,
                worker_port,
                {
                    **common,
                    "OPSC_GRPC_PORT": str(worker_port),
                    "OPSC_METRICS_PORT": str(s.worker_metrics_port if index == 0 else 0),
                },
                module_name="opsconductor.worker",
            )
            for index, worker_port in enumerate(worker_ports)
        ]
        http_port = port(s.progress_http_port)
        api_port, approvals_port = port(s.api_port), port(s.approvals_port)
        return [
            spec("api", api_port, s.api_metrics_port),
            *workers,
            spec("approvals", approvals_port, s.approvals_metrics_port),
            spec(
                "progress",
                port(s.progress_port),
                s.progress_metrics_port,
                note=f"HTTP {host}:{http_port}, UI {self.ui_url(host, http_port)}",
                OPSC_HTTP_HOST=host,
                OPSC_HTTP_PORT=str(http_port),
                # Its grpc-web bridge (the browser UI's lists and decisions) reaches these.
                OPSC_API_TARGET=f"{host}:{api_port}",
                OPSC_APPROVALS_TARGET=f"{host}:{approvals_port}",
            ),
            # The reaper (a Kubernetes CronJob in production) loops here.
            ServiceSpec(
                "reaper",
                host,
                0,
                {**common, "OPSC_SERVICE_NAME": "reaper"},
                note=f"every {s.reaper_interval_s:g} s",
                module_name="opsconductor.worker.reaper",
                args=("--interval", f"{s.reaper_interval_s:g}"),
            ),
        ]

    async def _spawn(self, spec: ServiceSpec) -> None:
        # The services inherit this environment (log level, JWT keys, ...) plus their overrides.
        process = await spawn_service(spec, os.environ, self.settings.devstack_log_dir)
        service = RunningService(spec, process)
        self.services.append(service)
        self._monitors.append(asyncio.create_task(self._watch(service)))
        log.info("service_started", service=spec.name, pid=process.pid, address=spec.address)

    async def _watch(self, service: RunningService) -> None:
        """Follow one service for the stack's lifetime: a death before the stack served is
        fatal; after, it means a restart with back-off."""
        while True:
            code = await service.process.wait()
            if self._stopping:
                return
            service.status = f"EXITED({code})"
            service.last_exit = code
            if not self._serving:
                log.error("service_died", service=service.spec.name, exit_code=code)
                self._service_died.set()
                return
            uptime = time.monotonic() - service.started_at
            stable = uptime >= self._backoff.stable_after_s
            service.quick_deaths = 1 if stable else service.quick_deaths + 1
            delay = self._backoff.delay(service.quick_deaths)
            log.warning(
                "service_exited",
                service=service.spec.name,
                exit_code=code,
                uptime_s=round(uptime, 1),
                restart_in_s=delay,
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop_requested.wait(), delay)
            if self._stopping or self._stop_requested.is_set():
                return
            service.process = await spawn_service(
                service.spec, os.environ, self.settings.devstack_log_dir
            )
            service.restarts += 1
            service.started_at = time.monotonic()
            service.status = "STARTING"
            log.info(
                "service_restarted",
                service=service.spec.name,
                pid=service.pid,
                restarts=service.restarts,
            )
            if service.spec.has_health:
                # Not awaited here: this loop must see the new process die even while polling.
                self._monitors.append(asyncio.create_task(self._announce_serving(service)))
            else:
                service.status = "RUNNING"
                self._print_rows()

    async def _announce_serving(self, service: RunningService) -> None:
        pid = service.pid
        await self._poll_health(service, pid=pid)
        if service.pid == pid and not self._stopping:
            print(f"{service.spec.name} restarted and SERVING again:", file=self.out)
            self._print_rows()
            self.out.flush()

    async def _all_serving(self) -> None:
        await asyncio.gather(*(self._poll_health(s) for s in self.services if s.spec.has_health))
        for service in self.services:
            if not service.spec.has_health:
                service.status = "RUNNING"

    async def _poll_health(self, service: RunningService, *, pid: int | None = None) -> None:
        """Poll until SERVING; with ``pid``, give up once that process is no longer current."""
        request = health_pb2.HealthCheckRequest(service="")
        async with grpc.aio.insecure_channel(
            service.spec.address, options=_CHANNEL_OPTIONS
        ) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while pid is None or (service.pid == pid and service.alive):
                try:
                    response = await stub.Check(request, timeout=_HEALTH_RPC_TIMEOUT_S)
                except grpc.aio.AioRpcError as exc:
                    status = exc.code().name
                else:
                    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
                if pid is not None and (service.pid != pid or not service.alive):
                    return
                service.status = status
                if status == "SERVING":
                    return
                await asyncio.sleep(_HEALTH_POLL_S)

    async def stop(self) -> None:
        """Stop every service, then the embedded servers (idempotent)."""
        await self._stop_services()
        await self._stop_dependencies()

    async def _stop_services(self) -> None:
        self._stopping = True
        self._stop_requested.set()
        for monitor in self._monitors:
            monitor.cancel()
        await asyncio.gather(*self._monitors, return_exceptions=True)
        self._monitors.clear()
        running = [s for s in self.services if s.alive]
        for service in running:
            signal_group(service.pid, signal.SIGTERM)
            # A paused (SIGSTOPped) service would sit on the SIGTERM until resumed.
            signal_group(service.pid, signal.SIGCONT)
        if running:
            waits = [service.process.wait() for service in running]
            try:
                await asyncio.wait_for(asyncio.gather(*waits), self.settings.devstack_stop_grace_s)
            except TimeoutError:
                for service in running:
                    if service.alive:
                        log.warning("service_killed", service=service.spec.name)
                        signal_group(service.pid, signal.SIGKILL)
                await asyncio.gather(*(service.process.wait() for service in running))
        for service in self.services:
            # Anything a service started in its group and left behind goes too.
            signal_group(service.pid, signal.SIGKILL)
            log.info(
                "service_stopped", service=service.spec.name, exit_code=service.process.returncode
            )
        self.services.clear()

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

    def _report_failed_start(self, outcome: str) -> None:
        if outcome == "died":
            dead = [s.spec.name for s in self.services if not s.alive]
            print(f"Service(s) died: {', '.join(dead)}; stopping the dev stack.", file=self.out)
        else:
            print(
                f"The dev stack did not reach SERVING within {self.settings.devstack_ready_s:g} s:",
                file=self.out,
            )
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

    @staticmethod
    def ui_url(host: str, http_port: int) -> str:
        """Where the browser UI of the progress service answers."""
        return f"http://{host}:{http_port}/ui/"

    def _print_identity(self) -> None:
        token = dev_token(self.jwt_key)
        api = self.service("api").spec.address
        progress = self.service("progress").spec.env
        ui = self.ui_url(progress["OPSC_HTTP_HOST"], int(progress["OPSC_HTTP_PORT"]))
        print(
            f"\ntenant {DEV_TENANT!r}, principal {DEV_PRINCIPAL!r} (admin), token valid 12 h:\n"
            f"  export OPSC_TOKEN={token}\n"
            f"  UI: {ui} (sign in by pasting the token)\n"
            f'  grpcurl -plaintext -H "authorization: Bearer $OPSC_TOKEN" '
            f'-d \'{{"tenant_id": "{DEV_TENANT}"}}\' '
            f"{api} opsconductor.execution.v1.ExecutionService/ListExecutions\n",
            file=self.out,
            flush=True,
        )

    def _print_rows(self) -> None:
        rows = [("SERVICE", "ADDRESS", "STATUS", "PID", "RESTARTS", "")]
        for s in self.services:
            address = s.spec.address if s.spec.has_health else "-"
            rows.append((s.spec.name, address, s.status, str(s.pid), str(s.restarts), s.spec.note))
        for d in self._dependencies:
            rows.append(
                (d.name, d.where, "RUNNING" if d.pid else "EXTERNAL", str(d.pid or "-"), "-", "")
            )
        widths = [max(len(row[i]) for row in rows) for i in range(5)]
        for row in rows:
            cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
            print("  " + "  ".join([*cells, row[5]]).rstrip(), file=self.out)


def worker_target(host: str, ports: list[int]) -> str:
    """The address the api and approvals reach the workers at.

    One worker: ``host:port``. Several: a gRPC ``ipv4:`` address list, which the client
    spreads calls over (round robin) and fails over from a dead worker.
    """
    if len(ports) == 1:
        return f"{host}:{ports[0]}"
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        return f"{host}:{ports[0]}"  # a name: only gRPC's DNS resolver applies
    return "ipv4:" + ",".join(f"{host}:{port}" for port in ports)


def _with_database(dsn: str, database: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit((parts.scheme, parts.netloc, f"/{database}", parts.query, parts.fragment))


async def _ensure_database(admin_dsn: str, database: str) -> None:
    conn: asyncpg.Connection = await asyncpg.connect(admin_dsn)
    try:
        exists = await conn.fetchval(_DATABASE_EXISTS, database)
        if not exists:
            with contextlib.suppress(asyncpg.DuplicateDatabaseError):
                # Composed: CREATE DATABASE takes a name, no parameter (the configured one).
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


__all__ = [
    "RunningService",
    "ServiceSpec",
    "StackStartError",
    "Supervisor",
    "run_devstack",
    "worker_target",
]
