"""The system under the soak: every service a real process, launched by the ``make run``
supervisor, on a database and a Redis of the soak's own.

* Postgres: a database created for this run (``opsc_chaos_<hex>``) on ``DATABASE_URL`` when set
  (the shared server; dropped at the end), else on an embedded Postgres in the run's folder.
* Redis: a ``redis-server`` of its own on a free port (``tests/e2e/redis_server.py``), so the
  fault driver may kill it and bring it back empty.
* The services: :class:`opsconductor.devstack.supervisor.Supervisor` with 3 workers, api,
  approvals, progress and the reaper loop, every port ephemeral, each service's output in
  ``<run dir>/logs/<name>.log``. The supervisor restarts what the fault driver kills.
* Drill settings (as the fault tests use): workers lease jobs for :data:`LEASE_S` seconds, the
  reaper runs every 2 s and fails a run 3 s past its deadline, so a dead or paused worker's work
  moves on within seconds instead of minutes.
* The tenants (Stage E on, approvals up to level 1), the principals and their roles, and the
  secret the plans reference (its literal known only to the driver and the workers).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import yaml
from opsc_test_actions.effects import SCHEMA

from opsconductor.common.secret_catalogue import env_namespace
from opsconductor.devstack.config import DevstackSettings
from opsconductor.devstack.dev_identity import dev_token
from opsconductor.devstack.embedded import EmbeddedPostgres, start_postgres
from opsconductor.devstack.services import RestartBackoff
from opsconductor.devstack.supervisor import Supervisor
from opsconductor.lifecycle.storage.db import create_pool
from opsconductor.lifecycle.storage.flags import update_flags
from opsconductor.lifecycle.storage.migrate import migrate_up
from opsconductor.lifecycle.storage.role_bindings import bind_role
from tests.e2e.redis_server import RedisServer

WORKERS = 3
#: Lease of background jobs (``OPSC_LEASE_S_OVERRIDE``): a paused worker loses its job after it.
LEASE_S = 3.0
#: Name of the secret every plan references (``{"$secret": "env:CHAOS_TOKEN"}``).
SECRET_NAME = "CHAOS_TOKEN"
TENANTS = ("chaos-a", "chaos-b")
DRIVER = "driver"
APPROVER = "approver"


def _with_database(dsn: str, database: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit((parts.scheme, parts.netloc, f"/{database}", parts.query, parts.fragment))


@dataclass
class ChaosStack:
    """A running soak stack; build it with :func:`start_stack`, end it with :meth:`stop`."""

    run_dir: Path
    database_url: str
    redis: RedisServer
    supervisor: Supervisor
    queue_prefix: str
    secret: str
    jwt_key: str
    _admin_dsn: str | None = None
    _database: str | None = None
    _embedded: EmbeddedPostgres | None = None
    intruders: list[str] = field(default_factory=list)

    @property
    def log_dir(self) -> Path:
        return self.run_dir / "logs"

    def address(self, service: str) -> str:
        return self.supervisor.service(service).spec.address

    def token(self, actor: str, tenant: str) -> str:
        return dev_token(self.jwt_key, actor=actor, tenant=tenant)

    def workers(self) -> list[str]:
        """Names of the worker services (``worker``, ``worker-2``, ...)."""
        return [s.spec.name for s in self.supervisor.services if s.spec.name.startswith("worker")]

    async def bind_intruder(self, pool: asyncpg.Pool, name: str) -> None:
        """A principal of the first tenant who will try to act in the second one."""
        await bind_role(pool, TENANTS[0], name, "operator", created_by="chaos")
        self.intruders.append(name)

    async def stop(self) -> None:
        """Stop the services, Redis and the embedded Postgres; drop the soak's database."""
        await self.supervisor.stop()
        self.supervisor.out.close()
        self.redis.kill()
        if self._admin_dsn is not None and self._database is not None:
            with contextlib.suppress(OSError, asyncpg.PostgresError):
                admin = await asyncpg.connect(self._admin_dsn)
                try:
                    await admin.execute(f'DROP DATABASE IF EXISTS "{self._database}" WITH (FORCE)')
                finally:
                    await admin.close()
        if self._embedded is not None:
            await asyncio.to_thread(self._embedded.stop)


async def _create_database(admin_dsn: str, name: str) -> str:
    admin = await asyncpg.connect(admin_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    return _with_database(admin_dsn, name)


async def _prepare(database_url: str) -> None:
    """Schema, the soak's side-effect table, tenants, principals and flags."""
    await migrate_up(database_url)
    pool = await create_pool(database_url, min_size=1, max_size=2)
    try:
        await pool.execute(SCHEMA)
        for tenant in TENANTS:
            # admin holds every permission, priority 0 included; approver decides approvals.
            await bind_role(pool, tenant, DRIVER, "admin", created_by="chaos")
            await bind_role(pool, tenant, APPROVER, "approver", created_by="chaos")
        await update_flags(
            pool,
            {"stage_e_enabled": True, "all_tenants_enabled": True, "max_approval_level": 1},
            by="chaos",
        )
    finally:
        await pool.close()


def secret_env(secret: str, run_dir: Path) -> dict[str, str]:
    """What resolves ``env:CHAOS_TOKEN`` for each chaos tenant: the variable in the tenant's
    namespace, and a secret catalogue (read by the api and the workers) letting that tenant
    give it to the ``chaos_effect`` action."""
    env: dict[str, str] = {}
    catalogue: dict[str, dict[str, object]] = {}
    for tenant in TENANTS:
        namespace = env_namespace(tenant)
        assert namespace is not None, tenant
        env[f"OPSC_SECRET_{namespace}__{SECRET_NAME}"] = secret
        catalogue[tenant] = {f"env:{SECRET_NAME}": {"actions": ["chaos_effect"]}}
    path = run_dir / "secret-catalogue.yaml"
    path.write_text(yaml.safe_dump({"tenants": catalogue}))
    env["OPSC_SECRETS_CATALOGUE_FILE"] = str(path)
    return env


async def start_stack(*, ready_s: float = 90.0) -> ChaosStack:
    """Everything up and SERVING (see the module docstring); the caller stops it."""
    run_dir = Path(tempfile.mkdtemp(prefix="opsc-chaos-"))
    # Embedded Postgres runs as the `pgserver` user, which must traverse the folder.
    run_dir.chmod(0o755)
    admin_dsn = os.environ.get("DATABASE_URL") or None
    embedded: EmbeddedPostgres | None = None
    if admin_dsn is None:
        embedded = await asyncio.to_thread(start_postgres, run_dir / "pg")
        server_dsn = embedded.dsn
    else:
        server_dsn = _with_database(admin_dsn, "postgres")
    database = f"opsc_chaos_{os.getpid()}_{secrets.token_hex(3)}"
    database_url = await _create_database(server_dsn, database)
    await _prepare(database_url)
    redis = RedisServer(run_dir)
    await redis.start()
    secret = f"chaos-{secrets.token_urlsafe(18)}"
    queue_prefix = f"opsc-chaos:{secrets.token_hex(4)}:"
    settings = DevstackSettings(
        database_url=database_url,
        redis_url=redis.url,
        devstack_dir=run_dir / "devstack",
        api_port=0,
        worker_port=0,
        approvals_port=0,
        progress_port=0,
        progress_http_port=0,
        api_metrics_port=0,
        worker_metrics_port=0,
        approvals_metrics_port=0,
        progress_metrics_port=0,
        workers=WORKERS,
        reaper_interval_s=2.0,
        devstack_log_dir=run_dir / "logs",
        devstack_ready_s=ready_s,
        devstack_stop_grace_s=10.0,
        log_json=True,
    )
    extra_env = {
        "OPSC_LOG_LEVEL": "INFO",
        "OPSC_QUEUE_PREFIX": queue_prefix,
        "OPSC_LEASE_S_OVERRIDE": str(LEASE_S),
        "OPSC_REAPER_DEADLINE_GRACE_S": "3",
        "OPSC_SHUTDOWN_GRACE_S": "5",
        "OPSC_CHAOS_EFFECTS_DSN": database_url,
        **secret_env(secret, run_dir),
    }
    out = (run_dir / "supervisor.out").open("a")
    supervisor = Supervisor(
        settings, out, extra_env=extra_env, backoff=RestartBackoff(first_s=0.2, max_s=2.0)
    )
    stack = ChaosStack(
        run_dir=run_dir,
        database_url=database_url,
        redis=redis,
        supervisor=supervisor,
        queue_prefix=queue_prefix,
        secret=secret,
        jwt_key=supervisor.jwt_key,
        _admin_dsn=server_dsn,
        _database=database,
        _embedded=embedded,
    )
    try:
        await supervisor.start()
    except BaseException:
        await stack.stop()
        raise
    return stack


def remove_run_dir(stack: ChaosStack) -> None:
    shutil.rmtree(stack.run_dir, ignore_errors=True)
