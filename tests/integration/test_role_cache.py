"""The role cache against a real Postgres: a revoked binding is refused once the change's
NOTIFY has arrived (well within a second), never later than the cache's age limit even if no
notification came, and nothing is served from it while its listener is down.

A binding changed with ``session_replication_role = replica`` fires no trigger: that is how a
lost notification is staged here. The e2e view (the worker refusing RunImmediate within a
second of a revocation): tests/e2e/test_immediate_rbac.py.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import asyncpg
import pytest

from opsconductor.common.auth import Principal
from opsconductor.common.errors import PermissionDeniedError
from opsconductor.lifecycle.storage.role_bindings import bind_role, unbind_role
from opsconductor.lifecycle.storage.role_cache import MAX_AGE_S, RoleCache
from opsconductor.policy.rbac import Authorizer, Permission, RbacPolicy

TENANT = "t-roles"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def cache(db_dsn: str) -> AsyncIterator[RoleCache]:
    # An age limit far beyond the test: only the notification can make it forget.
    roles = RoleCache(db_dsn, max_age_s=3600)
    await roles.start()
    try:
        yield roles
    finally:
        await roles.stop()


async def bind_heard(cache: RoleCache, pool: asyncpg.Pool, principal: str, role: str) -> None:
    """Bind, and wait until the cache heard of it (a late notification would empty it)."""
    heard = cache.changes_heard
    await bind_role(pool, TENANT, principal, role)
    deadline = time.monotonic() + 5
    while cache.changes_heard == heard:
        assert time.monotonic() < deadline, "the change was never heard"
        await asyncio.sleep(0.005)


async def unbind_silently(pool: asyncpg.Pool, principal: str, role: str) -> None:
    """Revoke with no trigger firing: a notification that never arrives."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SET LOCAL session_replication_role = replica")
        await conn.execute(
            "DELETE FROM role_bindings WHERE tenant_id = $1 AND principal = $2 AND role = $3",
            TENANT,
            principal,
            role,
        )


async def until_roles(
    cache: RoleCache, pool: asyncpg.Pool, principal: str, expected: frozenset[str]
) -> float:
    """Seconds until the cache answers ``expected`` (at most 1 s)."""
    started = time.monotonic()
    while await cache.roles(pool, TENANT, principal) != expected:
        assert time.monotonic() - started < 1.0, "the change was not seen within a second"
        await asyncio.sleep(0.005)
    return time.monotonic() - started


async def test_a_cached_binding_is_served_without_reading_postgres(
    cache: RoleCache, db_pool: asyncpg.Pool
) -> None:
    await bind_heard(cache, db_pool, "alice", "operator")
    assert await cache.roles(db_pool, TENANT, "alice") == {"operator"}
    await unbind_silently(db_pool, "alice", "operator")
    # Gone from Postgres, unheard of: the cached answer stands (what the cache saves).
    assert await cache.roles(db_pool, TENANT, "alice") == {"operator"}


async def test_a_revocation_is_seen_as_soon_as_its_notification_arrives(
    cache: RoleCache, db_pool: asyncpg.Pool
) -> None:
    await bind_heard(cache, db_pool, "alice", "operator")
    await bind_heard(cache, db_pool, "bob", "viewer")
    assert await cache.roles(db_pool, TENANT, "alice") == {"operator"}
    assert await cache.roles(db_pool, TENANT, "bob") == {"viewer"}
    await unbind_role(db_pool, TENANT, "alice", "operator")
    await until_roles(cache, db_pool, "alice", frozenset())
    # Any change drops every entry: bob is read again too (and a grant is seen likewise).
    await unbind_silently(db_pool, "bob", "viewer")
    assert await cache.roles(db_pool, TENANT, "bob") == frozenset()
    await bind_role(db_pool, TENANT, "alice", "deployer")
    await until_roles(cache, db_pool, "alice", frozenset({"deployer"}))


async def test_without_a_notification_a_binding_is_kept_no_longer_than_the_age_limit(
    db_dsn: str, db_pool: asyncpg.Pool
) -> None:
    assert MAX_AGE_S < 1.0  # the bound the worker's check promises
    clock = Clock()
    cache = RoleCache(db_dsn, clock=clock)
    await cache.start()
    try:
        await bind_heard(cache, db_pool, "alice", "operator")
        assert await cache.roles(db_pool, TENANT, "alice") == {"operator"}
        await unbind_silently(db_pool, "alice", "operator")
        clock.now += MAX_AGE_S * 0.9
        assert await cache.roles(db_pool, TENANT, "alice") == {"operator"}
        clock.now += MAX_AGE_S * 0.2
        assert await cache.roles(db_pool, TENANT, "alice") == frozenset()
    finally:
        await cache.stop()


async def test_nothing_is_cached_while_the_listener_is_down(
    cache: RoleCache, db_pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("opsconductor.lifecycle.storage.role_cache.RECONNECT_S", 0.2)
    await bind_heard(cache, db_pool, "alice", "operator")
    assert await cache.roles(db_pool, TENANT, "alice") == {"operator"}
    pids = await db_pool.fetch(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
        " AND query LIKE 'LISTEN%role_bindings_changed%'"
    )
    assert len(pids) == 1
    await db_pool.execute("SELECT pg_terminate_backend($1)", pids[0]["pid"])
    deadline = time.monotonic() + 5
    while cache.listening:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    # Deaf: a silent revocation is seen by the very next read.
    await unbind_silently(db_pool, "alice", "operator")
    assert await cache.roles(db_pool, TENANT, "alice") == frozenset()
    # Back by itself, caching again (and hearing changes again).
    while not cache.listening:
        assert time.monotonic() < deadline, "the listener did not come back"
        await asyncio.sleep(0.02)
    await bind_role(db_pool, TENANT, "alice", "operator")
    await until_roles(cache, db_pool, "alice", frozenset({"operator"}))
    await unbind_role(db_pool, TENANT, "alice", "operator")
    await until_roles(cache, db_pool, "alice", frozenset())


async def test_the_authorizer_refuses_a_revoked_binding_within_a_second(
    cache: RoleCache, db_pool: asyncpg.Pool
) -> None:
    authorizer = Authorizer(db_pool, RbacPolicy.load(), tier="worker", role_cache=cache)
    alice = Principal(actor_id="alice", tenant_id=TENANT, auth_method="jwt")
    await bind_role(db_pool, TENANT, "alice", "operator")
    allowed = {Permission.EXECUTIONS_SUBMIT}
    await authorizer.authorize(alice, tenant_id=TENANT, permissions=allowed)
    await unbind_role(db_pool, TENANT, "alice", "operator")
    revoked = time.monotonic()
    while True:
        try:
            await authorizer.authorize(alice, tenant_id=TENANT, permissions=allowed)
        except PermissionDeniedError:
            break
        assert time.monotonic() - revoked < 1.0, "still allowed a second after the revocation"
        await asyncio.sleep(0.005)
