"""A working identity for ``make run``: a local signing key, a ``dev`` tenant, and a token.

Services refuse unauthenticated calls, so a local stack is only usable with a key and a token.
The HS256 key lives in the data folder (created once, mode 0600) and is handed to the services;
the ``dev`` tenant is enabled for Stage E (that tenant only) and the principal ``dev-admin``
gets the ``admin`` role in it and in the system tenant (feature flags). The printed token lasts
12 hours; ``python -m opsconductor.devstack token`` mints another.

Secrets belong to a tenant and to destinations, so the ``dev`` tenant gets one of its own
(`dev_secrets`): ``file:dev_token`` (random, created once in ``secrets/dev/dev_token`` of the
data folder, mode 0600) and a secret catalogue (``secret-catalogue.yaml``) letting the ``noop``
action receive it — enough to try a ``$secret`` reference, and its refusal anywhere else.
"""

from __future__ import annotations

import secrets
from datetime import timedelta
from pathlib import Path

import asyncpg
from pydantic import SecretStr

from opsconductor.common.auth import issue_token
from opsconductor.lifecycle.storage.db import create_pool
from opsconductor.lifecycle.storage.flags import SYSTEM_TENANT, load_flags, update_flags
from opsconductor.lifecycle.storage.role_bindings import bind_role

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


#: The dev tenant's secret (``{"$secret": "file:dev_token"}``) and what may receive it.
DEV_SECRET_REF = "file:dev_token"  # noqa: S105 - a reference, not a value
DEV_CATALOGUE = f"""\
# Written by make run: where the dev tenant's secrets may be used (docs/security.md).
tenants:
  {DEV_TENANT}:
    "{DEV_SECRET_REF}":
      actions: [noop]
"""


def dev_secrets(devstack_dir: Path) -> dict[str, str]:
    """The dev tenant's secret file and the catalogue, created once; the services' variables.

    ``OPSC_SECRETS_FILE_ROOT`` and ``OPSC_SECRETS_CATALOGUE_FILE`` point at them.
    """
    root = devstack_dir / "secrets"
    folder = root / DEV_TENANT
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    secret = folder / DEV_SECRET_REF.split(":", 1)[1]
    if not secret.exists():
        secret.touch(mode=0o600)
        secret.write_text(secrets.token_urlsafe(24))
    catalogue = devstack_dir / "secret-catalogue.yaml"
    catalogue.write_text(DEV_CATALOGUE)
    return {"OPSC_SECRETS_FILE_ROOT": str(root), "OPSC_SECRETS_CATALOGUE_FILE": str(catalogue)}


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
