"""End-to-end fixtures: the api and the worker as real processes on a database of their own.

Redis is deliberately pointed at a port nothing listens on: the immediate path must not need it.
Each test gets its own tenant (with role bindings), so tests sharing one stack never see each
other's executions.
"""

from __future__ import annotations

import secrets
import socket
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import asyncpg
import pytest
import yaml
from pydantic import SecretStr

from opsconductor.client import ApprovalClient, ExecutionClient
from opsconductor.common.auth import issue_token
from opsconductor.common.secret_catalogue import env_namespace
from opsconductor.lifecycle.storage.db import create_pool
from opsconductor.lifecycle.storage.flags import update_flags
from opsconductor.lifecycle.storage.role_bindings import bind_role
from tests.conftest import RUN_ID, with_database

from .stack import AUDIENCE, HS256_KEY, Stack, start_service

#: A secret value the worker can resolve (as env:E2E_DB_PASSWORD, for tenant SECRET_TENANT
#: only); it must never be persisted or logged anywhere.
PLANTED_SECRET = f"PlantedSecret-{secrets.token_hex(8)}"
#: Secrets live in a tenant's namespace and the catalogue names tenants, both fixed when the
#: stack starts: these tenants have secrets (tests of other tenants get fresh ids).
SECRET_TENANT = f"t-sec-a-{secrets.token_hex(4)}"
OTHER_SECRET_TENANT = f"t-sec-b-{secrets.token_hex(4)}"
#: The other tenant's own secret (env:E2E_DB_PASSWORD and file:e2e_token in its namespace).
OTHER_PLANTED_SECRET = f"OtherTenantSecret-{secrets.token_hex(8)}"
#: A secret every encoding changes (quote, backslash, slash, plus, space, percent, non-ASCII):
#: env:E2E_FANCY of SECRET_TENANT, for the probe's encoded echoes (issue 8, finding 4).
FANCY_SECRET = f'Fa"ncy\\S\u00e9cret/+ %-{secrets.token_hex(6)}'
#: SECRET_TENANT's API token (env:E2E_API_TOKEN), for ALLOWED_API_HOST only.
API_TOKEN_SECRET = f"ApiTokenSecret-{secrets.token_hex(8)}"
#: A host SECRET_TENANT's API token may be sent to (nothing listens there: tests show refusals).
ALLOWED_API_HOST = "api.allowed.example"
#: The secret catalogue every stack's api and worker load.
SECRET_CATALOGUE: dict[str, object] = {
    "tenants": {
        SECRET_TENANT: {
            "env:E2E_DB_PASSWORD": {"actions": ["probe"]},
            "env:E2E_API_TOKEN": {"http": [ALLOWED_API_HOST]},
            "env:E2E_FANCY": {"actions": ["probe"]},
            # Allowed uses of names that only the other tenant has: resolving them must fail.
            "file:e2e_token": {"actions": ["probe"]},
            "env:OTHER_DB_PASSWORD": {"actions": ["probe"]},
        },
        OTHER_SECRET_TENANT: {
            "env:E2E_DB_PASSWORD": {"actions": ["probe"]},
            "file:e2e_token": {"actions": ["probe"]},
        },
    }
}


def env_secret(tenant: str, name: str) -> str:
    """The worker variable holding ``name`` in ``tenant``'s namespace."""
    namespace = env_namespace(tenant)
    assert namespace is not None
    return f"OPSC_SECRET_{namespace}__{name}"


def write_secret_files() -> dict[str, str]:
    """The catalogue file and the file provider's root with the other tenant's file secret
    (outside the log folder the tests scan); the variables pointing services at them."""
    folder = Path(tempfile.mkdtemp(prefix="opsc-e2e-secrets-"))
    catalogue = folder / "secret-catalogue.yaml"
    catalogue.write_text(yaml.safe_dump(SECRET_CATALOGUE))
    root = folder / "secrets"
    (root / OTHER_SECRET_TENANT).mkdir(parents=True)
    (root / SECRET_TENANT).mkdir()
    (root / OTHER_SECRET_TENANT / "e2e_token").write_text(OTHER_PLANTED_SECRET + "\n")
    # The pre-namespace layout (one folder for all): no tenant may reach it any more.
    (root / "e2e_token").write_text(OTHER_PLANTED_SECRET + "\n")
    return {"OPSC_SECRETS_CATALOGUE_FILE": str(catalogue), "OPSC_SECRETS_FILE_ROOT": str(root)}


def dead_redis_url() -> str:
    """A Redis URL whose port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"redis://127.0.0.1:{port}/0"


def token(actor: str, tenant: str, ttl: timedelta = timedelta(minutes=30)) -> str:
    return issue_token(
        actor_id=actor, tenant_id=tenant, audience=AUDIENCE, hs256_key=SecretStr(HS256_KEY), ttl=ttl
    )


@pytest.fixture(scope="module")
async def e2e_dsn(server_dsn: str, template_db: str) -> AsyncIterator[str]:
    name = f"opsc_test_{RUN_ID}_e2e_{secrets.token_hex(3)}"
    admin = await asyncpg.connect(with_database(server_dsn, "postgres"))
    try:
        await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_db}"')
        yield with_database(server_dsn, name)
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


@pytest.fixture(scope="module")
async def e2e_pool(e2e_dsn: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await create_pool(e2e_dsn, min_size=1, max_size=10)
    await update_flags(pool, {"stage_e_enabled": True, "all_tenants_enabled": True}, by="e2e")
    try:
        yield pool
    finally:
        await pool.close()


@asynccontextmanager
async def running_stack(
    dsn: str,
    redis_url: str,
    *,
    with_approvals: bool = False,
    with_progress: bool = False,
    progress_env: dict[str, str] | None = None,
    tenant_policy_file: Path | None = None,
    common_env: dict[str, str] | None = None,
    **worker_env: str,
) -> AsyncIterator[Stack]:
    """Worker and api processes (and the approvals and progress services if asked) on ``dsn``
    with ``redis_url``, stopped on exit; every service reads ``tenant_policy_file`` if given and
    gets ``common_env``. The progress service's HTTP port is ``stack.http_port("progress")``."""
    log_dir = Path(tempfile.mkdtemp(prefix="opsc-e2e-"))
    running = Stack(dsn=dsn, log_dir=log_dir)
    common = {
        "OPSC_REDIS_URL": redis_url,
        "OPSC_QUEUE_PREFIX": f"opsc-e2e:{RUN_ID}:{secrets.token_hex(3)}:",
    }
    if tenant_policy_file is not None:
        common["OPSC_TENANT_POLICY_FILE"] = str(tenant_policy_file)
    common.update(write_secret_files())
    common.update(common_env or {})
    planted = {
        env_secret(SECRET_TENANT, "E2E_DB_PASSWORD"): PLANTED_SECRET,
        env_secret(OTHER_SECRET_TENANT, "E2E_DB_PASSWORD"): OTHER_PLANTED_SECRET,
        env_secret(SECRET_TENANT, "E2E_API_TOKEN"): API_TOKEN_SECRET,
        env_secret(SECRET_TENANT, "E2E_FANCY"): FANCY_SECRET,
        # The pre-namespace name: a tenant must not reach it any more.
        "OPSC_SECRET_E2E_DB_PASSWORD": OTHER_PLANTED_SECRET,
    }
    try:
        worker = await start_service("worker", running, {**common, **planted, **worker_env})
        await start_service("api", running, {**common, "OPSC_WORKER_TARGET": worker.address})
        if with_approvals:
            await start_service(
                "approvals", running, {**common, "OPSC_WORKER_TARGET": worker.address}
            )
        if with_progress:
            await start_service(
                "progress",
                running,
                {
                    **common,
                    "OPSC_HTTP_PORT": "0",
                    "OPSC_HTTP_PORT_FILE": str(log_dir / "progress.http-port"),
                    "OPSC_API_TARGET": running.address("api"),
                    "OPSC_APPROVALS_TARGET": (
                        running.address("approvals") if with_approvals else "127.0.0.1:9"
                    ),
                    **(progress_env or {}),
                },
            )
        yield running
    finally:
        await running.stop()


@pytest.fixture(scope="module")
async def stack(e2e_dsn: str, e2e_pool: asyncpg.Pool) -> AsyncIterator[Stack]:
    """The immediate-path stack: Redis deliberately unreachable."""
    async with running_stack(e2e_dsn, dead_redis_url()) as running:
        yield running


@dataclass
class Tenant:
    """A fresh tenant with principals bound to roles, and clients acting as them."""

    id: str
    stack: Stack
    pool: asyncpg.Pool

    def client(self, actor: str, *, tenant: str | None = None) -> ExecutionClient:
        """A client for ``actor`` holding a token of ``tenant`` (default: this tenant)."""
        return ExecutionClient(self.stack.address("api"), token(actor, tenant or self.id))

    def approvals(self, actor: str, *, tenant: str | None = None) -> ApprovalClient:
        """An ApprovalService client for ``actor`` (needs a stack started ``with_approvals``)."""
        return ApprovalClient(self.stack.address("approvals"), token(actor, tenant or self.id))

    async def bind(self, actor: str, role: str) -> None:
        await bind_role(self.pool, self.id, actor, role, created_by="e2e")


async def bound_tenant(tenant_id: str, stack: Stack, pool: asyncpg.Pool) -> Tenant:
    """``tenant_id`` with alice operator, dave deployer, vera viewer, ada admin."""
    t = Tenant(id=tenant_id, stack=stack, pool=pool)
    for actor, role in (("alice", "operator"), ("dave", "deployer"), ("vera", "viewer")):
        await t.bind(actor, role)
    await t.bind("ada", "admin")
    return t


@pytest.fixture
async def tenant(stack: Stack, e2e_pool: asyncpg.Pool) -> Tenant:
    """A tenant of this test only: alice operator, dave deployer, vera viewer, ada admin."""
    return await bound_tenant(f"t-{secrets.token_hex(4)}", stack, e2e_pool)


@pytest.fixture
async def secret_tenant(stack: Stack, e2e_pool: asyncpg.Pool) -> Tenant:
    """SECRET_TENANT (shared by the tests of a module): the tenant whose secrets the stack has."""
    return await bound_tenant(SECRET_TENANT, stack, e2e_pool)


@pytest.fixture
def ledger(tmp_path: Path) -> Path:
    """The probe action's side-effect ledger for this test."""
    return tmp_path / "ledger.jsonl"


Eventually = Callable[[Callable[[], Awaitable[bool]], float], Awaitable[None]]
