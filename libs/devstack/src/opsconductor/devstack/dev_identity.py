"""A working identity for ``make run``: a local signing key, a ``dev`` tenant, and a token.

Services refuse unauthenticated calls, so a local stack is only usable with a key and a token.
The HS256 key lives in the data folder (created once, mode 0600) and is handed to the services;
the ``dev`` tenant is enabled for Stage E (that tenant only) and the principal ``dev-admin``
gets the ``admin`` role in it and in the system tenant (feature flags). The printed token lasts
12 hours; ``python -m opsconductor.devstack token`` mints another.
"""

from __future__ import annotations

import secrets
from datetime import timedelta
from pathlib import Path

import asyncpg
from pydantic import SecretStr

from opsconductor.common.auth import issue_token
from opsconductor.common.storage.db import create_pool
from opsconductor.common.storage.flags import SYSTEM_TENANT, load_flags, update_flags
from opsconductor.common.storage.role_bindings import bind_role

DEV_TENANT = "dev"
DEV_PRINCIPAL = "dev-admin"
AUDIENCE = "opsconductor-execution"
TOKEN_TTL = timedelta(hours=12)


def signing_key(devstack_dir: Path) -> str:
    """The stack's HS256 key, created on first use."""
    path = devstack_dir / "jwt-hs256.key"
    if not path.exists():
        devstack_dir.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.write_text(secrets.token_hex(32))
    return path.read_text().strip()


def dev_token(key: str, *, actor: str = DEV_PRINCIPAL, tenant: str = DEV_TENANT) -> str:
    return issue_token(
        actor_id=actor, tenant_id=tenant, audience=AUDIENCE, hs256_key=SecretStr(key), ttl=TOKEN_TTL
    )


async def seed_dev_tenant(database_url: str) -> None:
    """Enable Stage E for the dev tenant and make dev-admin its admin (idempotent)."""
    pool: asyncpg.Pool = await create_pool(database_url, min_size=1, max_size=2)
    try:
        for tenant in (DEV_TENANT, SYSTEM_TENANT):
            await bind_role(pool, tenant, DEV_PRINCIPAL, "admin", created_by="devstack")
        flags = await load_flags(pool)
        if not flags.stage_e_enabled or DEV_TENANT not in flags.enabled_tenants:
            await update_flags(
                pool,
                {
                    "stage_e_enabled": True,
                    "enabled_tenants": sorted(flags.enabled_tenants | {DEV_TENANT}),
                },
                by="devstack",
            )
    finally:
        await pool.close()
