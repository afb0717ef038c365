"""AdminOperations' dead-letter queue and queue gauges on the in-memory lifecycle: who sees and
requeues which tenant's entries (a tenant admin only their own, a system admin any), a tenant
rolled back from Stage E cannot requeue, and GetQueueStats' overview. Feature flags, drain and
the audit-chain check read their own stores (integration and e2e tests)."""

from __future__ import annotations

from uuid import UUID

import pytest

from opsconductor.api.logic.admin import AdminOperations
from opsconductor.common.auth import Principal
from opsconductor.common.errors import (
    FeatureDisabledError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    QueueUnavailableError,
)
from opsconductor.common.fsm import ExecutionStatus
from opsconductor.lifecycle.fake import InMemoryLifecycle
from opsconductor.lifecycle.storage.flags import SYSTEM_TENANT, FeatureFlags
from tests.unit.dlq_world import Flags, background_plan
from tests.unit.dlq_world import dead_lettered as world_dead_lettered
from tests.unit.roles_world import MEDIUM_MODIFY, Roles

ROOT = Principal(actor_id="root", tenant_id=SYSTEM_TENANT)
T1_ADMIN = Principal(actor_id="ada", tenant_id="t1")
T1_OPERATOR = Principal(actor_id="olly", tenant_id="t1")


def admin(
    lifecycle: InMemoryLifecycle, flags: FeatureFlags | None = None
) -> tuple[AdminOperations, Roles]:
    roles = Roles(
        {
            (SYSTEM_TENANT, "root"): frozenset({"admin"}),
            ("t1", "ada"): frozenset({"admin"}),
            ("t1", "olly"): frozenset({"operator"}),
        },
        tier="api",
    )
    operations = AdminOperations(
        pool=None,  # type: ignore[arg-type]  # flags are faked; no store reached here
        authorizer=roles,
        flags=Flags(flags or FeatureFlags(stage_e_enabled=True, all_tenants_enabled=True)),
        lifecycle=lifecycle,
        policies={MEDIUM_MODIFY.id: MEDIUM_MODIFY},
    )
    return operations, roles


async def dead_lettered(lifecycle: InMemoryLifecycle, tenant: str, error_class: str) -> UUID:
    _, dlq_id = await world_dead_lettered(lifecycle, background_plan(tenant), error_class)
    return dlq_id


async def test_a_system_admin_lists_every_tenants_entries_and_filters_them() -> None:
    lifecycle = InMemoryLifecycle()
    ops, _ = admin(lifecycle)
    t1 = await dead_lettered(lifecycle, "t1", "ACTION_FAILED")
    t2 = await dead_lettered(lifecycle, "t2", "LeaseExpired")
    every, token = await ops.list_dlq(
        ROOT, tenant_id="", error_class="", page_size=0, page_token=""
    )
    assert ({e.id for e in every}, token) == ({t1, t2}, None)
    only, _ = await ops.list_dlq(
        ROOT, tenant_id="", error_class="LeaseExpired", page_size=0, page_token=""
    )
    assert [e.id for e in only] == [t2]
    first, token = await ops.list_dlq(
        ROOT, tenant_id="", error_class="", page_size=1, page_token=""
    )
    rest, end = await ops.list_dlq(
        ROOT, tenant_id="", error_class="", page_size=1, page_token=token or ""
    )
    assert ([e.id for e in first + rest], end) == ([t2, t1], None)  # newest first


async def test_a_tenant_admin_sees_and_requeues_only_their_own_tenants_entries() -> None:
    lifecycle = InMemoryLifecycle()
    ops, roles = admin(lifecycle)
    mine = await dead_lettered(lifecycle, "t1", "ACTION_FAILED")
    theirs = await dead_lettered(lifecycle, "t2", "ACTION_FAILED")
    listed, _ = await ops.list_dlq(
        T1_ADMIN, tenant_id="t1", error_class="", page_size=0, page_token=""
    )
    assert [e.id for e in listed] == [mine]
    for tenant in ("", "t2"):  # all tenants, or another's: refused and audited
        with pytest.raises(PermissionDeniedError):
            await ops.list_dlq(
                T1_ADMIN, tenant_id=tenant, error_class="", page_size=0, page_token=""
            )
    with pytest.raises(PermissionDeniedError):
        await ops.list_dlq(T1_OPERATOR, tenant_id="t1", error_class="", page_size=0, page_token="")
    assert len(roles.audited) == 3
    with pytest.raises(NotFoundError):
        await ops.requeue_dlq(T1_ADMIN, theirs)
    result = await ops.requeue_dlq(T1_ADMIN, mine, request_id="req-9")
    assert (result.execution.tenant_id, result.execution.status) == ("t1", ExecutionStatus.QUEUED)
    assert result.entry.requeued_by == "ada"
    assert theirs in {e.id for e in lifecycle.dlq.values()}


async def test_a_tenant_rolled_back_from_stage_e_cannot_requeue() -> None:
    lifecycle = InMemoryLifecycle()
    ops, _ = admin(lifecycle, FeatureFlags(stage_e_enabled=True, all_tenants_enabled=False))
    dlq_id = await dead_lettered(lifecycle, "t1", "ACTION_FAILED")
    with pytest.raises(FeatureDisabledError):
        await ops.requeue_dlq(ROOT, dlq_id)
    assert lifecycle.dlq  # still open
    assert lifecycle.jobs == {}


async def test_overlong_filters_are_invalid_arguments() -> None:
    ops, _ = admin(InMemoryLifecycle())
    for tenant, error_class, field in (
        ("t" * 101, "", "tenant_id"),
        ("", "E" * 101, "error_class"),
    ):
        with pytest.raises(InvalidArgumentError) as refused:
            await ops.list_dlq(
                ROOT, tenant_id=tenant, error_class=error_class, page_size=0, page_token=""
            )
        assert refused.value.details["field"] == field


async def test_queue_stats_report_the_queues_gauges_and_the_open_dlq_size() -> None:
    lifecycle = InMemoryLifecycle()
    ops, _ = admin(lifecycle)
    await dead_lettered(lifecycle, "t1", "ACTION_FAILED")
    overview = await ops.queue_stats(ROOT)
    assert (overview.dlq_size, overview.stats.ready, overview.stats.leased) == (1, 0, 0)
    with pytest.raises(PermissionDeniedError):
        await ops.queue_stats(T1_ADMIN)  # global: authorized in the system tenant
    lifecycle.queue_up = False
    with pytest.raises(QueueUnavailableError):
        await ops.queue_stats(ROOT)
