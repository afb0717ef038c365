"""AdminService on the background path, end to end: DLQ list and requeue, drain, queue stats,
and who may call each RPC (api and worker as real processes, a real Redis under a key prefix of
this module's own, a database of this module's own).
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from uuid import UUID

import asyncpg
import pytest
from opsc_test_actions import read_ledger

from opsconductor.client import (
    ConflictError,
    DlqEntry,
    Execution,
    ExecutionClient,
    NotFoundError,
    PermissionDeniedError,
    QueueStats,
)
from opsconductor.lifecycle.storage.flags import SYSTEM_TENANT

from .conftest import Tenant, running_stack
from .inspection import new_tenant, rbac_violations, wait_until
from .plans import plan, probe_step
from .stack import Stack

#: How long a test watches for something that must NOT happen (a drained queue dispatching):
#: an idle worker polls the queue at least once a second, so this covers several polls.
QUIET_WINDOW_S = 2.5


@pytest.fixture(scope="module")
async def stack(e2e_dsn: str, e2e_pool: asyncpg.Pool, redis_url: str) -> AsyncIterator[Stack]:
    """This module's stack talks to a real Redis (under a key prefix of its own)."""
    async with running_stack(e2e_dsn, redis_url) as running:
        yield running


@pytest.fixture(scope="module")
async def system(stack: Stack, e2e_pool: asyncpg.Pool) -> Tenant:
    """The system tenant: ``root`` is its admin, ``watcher`` only a viewer there."""
    tenant = Tenant(id=SYSTEM_TENANT, stack=stack, pool=e2e_pool)
    await tenant.bind("root", "admin")
    await tenant.bind("watcher", "viewer")
    return tenant


@pytest.fixture
async def root(system: Tenant) -> AsyncIterator[ExecutionClient]:
    """A system admin's client; dispatch is resumed after the test whatever happened."""
    async with system.client("root") as client:
        try:
            yield client
        finally:
            await client.set_drain(False)


def background_plan(ledger: Path, *, name: str | None = None, **params: Any) -> dict[str, Any]:
    """A one-step probe plan estimated at 11 s: background by the mode decision."""
    return plan(
        # A target of its own: jobs running side by side must not meet on the mutex.
        probe_step("probe", [f"db:{secrets.token_hex(4)}"], ledger, estimate_ms=11_000, **params),
        sla="medium",
        name=name,
    )


async def wait_status(
    client: ExecutionClient, execution_id: str, tenant_id: str, within_s: float
) -> Execution:
    async def terminal() -> Execution | None:
        current = await client.get(execution_id, tenant_id=tenant_id)
        return current if current.is_terminal else None

    return await wait_until(terminal, within_s=within_s, what=f"{execution_id} to end")


async def events_of(pool: asyncpg.Pool, execution_id: str) -> list[asyncpg.Record]:
    return await pool.fetch(
        "SELECT type, actor_id, payload FROM execution_events WHERE execution_id = $1 ORDER BY seq",
        UUID(execution_id),
    )


async def open_entry(client: ExecutionClient, tenant_id: str, within_s: float) -> DlqEntry:
    async def listed() -> DlqEntry | None:
        entries, _ = await client.list_dlq_entries(tenant_id=tenant_id)
        return entries[0] if entries else None

    return await wait_until(listed, within_s=within_s, what="a DLQ entry", interval_s=0.2)


async def test_a_dead_lettered_job_is_listed_and_requeued_as_a_new_execution_that_succeeds(
    tenant: Tenant, tmp_path: Path, stack: Stack, e2e_pool: asyncpg.Pool, root: ExecutionClient
) -> None:
    """A job whose step fails every attempt (its ledger folder does not exist) ends failed in
    the DLQ after max_attempts (fast: 3); its tenant admin lists it (filtered by error class)
    and requeues it once the folder exists: a NEW execution of the same plan runs and succeeds,
    the old one stays failed with ``execution_completed`` last, and a second requeue is refused."""
    ledger = tmp_path / "created-later" / "ledger.jsonl"
    failing = plan(probe_step("probe", ["db:dlq"], ledger), sla="fast")
    async with tenant.client("alice") as alice, tenant.client("ada") as ada:
        queued = await alice.submit(failing, tenant_id=tenant.id, requested_mode="background")
        assert (queued.status, queued.execution_mode) == ("queued", "background")
        # Backoff 2 s then 4 s between the three attempts.
        entry = await open_entry(ada, tenant.id, within_s=40)
        old = await alice.get(queued.execution_id, tenant_id=tenant.id)
        assert (old.status, old.attempts) == ("failed", 3)
        assert (entry.execution_id, entry.tenant_id, entry.attempts) == (
            old.execution_id,
            tenant.id,
            3,
        )
        assert entry.error_class == old.error_class == "FileNotFoundError"
        assert entry.requeued_at is None
        assert (await ada.list_dlq_entries(tenant_id=tenant.id, error_class="Other"))[0] == []
        listed, _ = await ada.list_dlq_entries(tenant_id=tenant.id, error_class="FileNotFoundError")
        assert [e.dlq_id for e in listed] == [entry.dlq_id]
        everything, _ = await root.list_dlq_entries()
        assert entry.dlq_id in {e.dlq_id for e in everything}
        assert (await root.get_queue_stats()).dlq_size == len(everything)

        outsider = await new_tenant(stack, e2e_pool)
        async with outsider.client("ada") as other_admin:
            with pytest.raises(NotFoundError):
                await other_admin.requeue_dlq_entry(entry.dlq_id)

        ledger.parent.mkdir()
        requeued = await ada.requeue_dlq_entry(entry.dlq_id)
        assert requeued.execution_id != old.execution_id
        assert requeued.job_id
        assert (requeued.entry.dlq_id, requeued.entry.requeued_by) == (entry.dlq_id, "ada")
        assert requeued.entry.requeued_at is not None
        rerun = await wait_status(alice, requeued.execution_id, tenant.id, within_s=30)
        assert rerun.status == "succeeded", (rerun.error_class, rerun.error_message)
        assert (rerun.plan_hash, rerun.idempotency_key) == (old.plan_hash, old.idempotency_key)
        assert (rerun.actor_id, rerun.attempts) == ("alice", 1)
        assert [(line["execution_id"], line["outcome"]) for line in read_ledger(ledger)] == [
            (requeued.execution_id, "ok")
        ]

        # Events are served by ProgressService, not part of this stack: read them in Postgres.
        old_events = await events_of(e2e_pool, old.execution_id)
        assert old_events[-1]["type"] == "execution_completed"
        assert (await ada.get(old.execution_id, tenant_id=tenant.id)).status == "failed"
        audit = [
            e
            for e in await events_of(e2e_pool, requeued.execution_id)
            if e["type"] == "dlq_requeued"
        ]
        assert len(audit) == 1
        assert audit[0]["actor_id"] == "ada"
        assert audit[0]["payload"]["requeued_from"] == old.execution_id
        assert audit[0]["payload"]["dlq_id"] == entry.dlq_id

        assert (await ada.list_dlq_entries(tenant_id=tenant.id))[0] == []
        with pytest.raises(ConflictError, match=requeued.execution_id):
            await ada.requeue_dlq_entry(entry.dlq_id)


async def test_drain_stops_dispatch_and_resume_runs_the_queued_job(
    tenant: Tenant, ledger: Path, root: ExecutionClient
) -> None:
    """SetDrain(true) pauses dispatch (flag and queue): a job submitted meanwhile stays queued
    and untouched; SetDrain(false) resumes and the job runs. UpdateFeatureFlags of
    dispatch_paused drains the same way."""
    assert await root.set_drain(True) is True
    assert (await root.get_feature_flags()).dispatch_paused
    assert (await root.get_queue_stats()).dispatch_paused
    async with tenant.client("alice") as alice:
        queued = await alice.submit(background_plan(ledger), tenant_id=tenant.id)
        watch_until = time.monotonic() + QUIET_WINDOW_S
        while time.monotonic() < watch_until:
            current = await alice.get(queued.execution_id, tenant_id=tenant.id)
            assert (current.status, current.attempts) == ("queued", 0)
            await asyncio.sleep(0.1)
        assert read_ledger(ledger) == []
        assert await root.set_drain(False) is False
        assert not (await root.get_feature_flags()).dispatch_paused
        done = await wait_status(alice, queued.execution_id, tenant.id, within_s=30)
        assert done.status == "succeeded"
        assert len(read_ledger(ledger)) == 1

        flags = await root.update_feature_flags(dispatch_paused=True)
        assert flags.dispatch_paused
        assert (await root.get_queue_stats()).dispatch_paused
        second = await alice.submit(background_plan(ledger), tenant_id=tenant.id)
        await root.update_feature_flags(dispatch_paused=False)
        assert not (await root.get_queue_stats()).dispatch_paused
        assert (await wait_status(alice, second.execution_id, tenant.id, 30)).status == "succeeded"


async def test_queue_stats_report_ready_per_priority_leased_delayed_and_the_dlq(
    tenant: Tenant, tmp_path: Path, root: ExecutionClient, e2e_pool: asyncpg.Pool
) -> None:
    """GetQueueStats counts exactly: ready jobs per priority while drained (with the age of the
    oldest), a running job as leased, a job in retry backoff as delayed, and open DLQ entries."""

    async def no_lease_left() -> bool:
        return (await root.get_queue_stats()).leased == 0

    # An earlier test's last job: its worker acks Redis just after the commit that ended it
    # (wait_status saw that commit), so its lease may still be counted for a moment — never
    # for long (a lease left behind would be a leak, and fails here).
    await wait_until(no_lease_left, within_s=15, what="the earlier jobs' Redis acks")
    await root.set_drain(True)
    await tenant.bind("alice", "responder")  # priority 0 needs executions:urgent
    submitted_at = time.monotonic()
    priorities = [0, 0, 0, 50, 50, 100]
    async with tenant.client("alice") as alice:
        ready = [
            await alice.submit(
                background_plan(tmp_path / f"ready-{i}.jsonl"), tenant_id=tenant.id, priority=p
            )
            for i, p in enumerate(priorities)
        ]
        stats = await root.get_queue_stats()
        open_dlq = await e2e_pool.fetchval(
            "SELECT count(*) FROM execution_dlq WHERE requeued_at IS NULL"
        )
        assert stats == QueueStats(
            ready_by_priority={0: 3, 50: 2, 100: 1},
            leased=0,
            delayed=0,
            dlq_size=open_dlq,
            oldest_ready_age_seconds=stats.oldest_ready_age_seconds,
            dispatch_paused=True,
        )
        assert 0 < stats.oldest_ready_age_seconds <= time.monotonic() - submitted_at + 0.5
        await root.set_drain(False)
        for execution in ready:
            assert (await wait_status(alice, execution.execution_id, tenant.id, 30)).status == (
                "succeeded"
            )
        await wait_until(no_lease_left, within_s=15, what="the ready jobs' Redis acks")

        holding = await alice.submit(
            background_plan(tmp_path / "hold.jsonl", hold_s=3), tenant_id=tenant.id
        )
        flaky = await alice.submit(
            background_plan(tmp_path / "flaky.jsonl", fail_times=1), tenant_id=tenant.id
        )

        seen: list[QueueStats] = []

        async def leased_and_delayed() -> QueueStats | None:
            current = await root.get_queue_stats()
            if not seen or seen[-1] != current:
                seen.append(current)
            return current if (current.leased, current.delayed) == (1, 1) else None

        # The holder runs for 3 s; the flaky job fails at once and backs off for 2 s.
        try:
            both = await wait_until(leased_and_delayed, within_s=10, what="1 leased and 1 delayed")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; the stats seen meanwhile: {seen}") from None
        assert both.ready == 0
        for execution in (holding, flaky):
            assert (await wait_status(alice, execution.execution_id, tenant.id, 30)).status == (
                "succeeded"
            )

    # The worker acks a job just after it recorded the execution's end: wait for that ack.
    async def drained() -> QueueStats | None:
        final = await root.get_queue_stats()
        return final if (final.ready, final.leased, final.delayed) == (0, 0, 0) else None

    await wait_until(drained, within_s=10, what="the last job acked")


async def test_every_admin_rpc_checks_who_calls(
    tenant: Tenant, system: Tenant, e2e_pool: asyncpg.Pool, root: ExecutionClient
) -> None:
    """Queue stats and drain need admin:queue in _system: a tenant admin, an operator and a
    _system viewer are refused. The DLQ needs admin:dlq: in _system (any tenant) or in the
    caller's own tenant, named in the request; anything else is refused. Each refusal is
    PERMISSION_DENIED and audited in the tenant that was targeted."""
    unknown_entry = "00000000-0000-4000-8000-000000000000"
    async with (
        tenant.client("ada") as ada,
        tenant.client("alice") as alice,
        system.client("watcher") as watcher,
    ):
        for caller in (ada, alice, watcher):
            with pytest.raises(PermissionDeniedError):
                await caller.get_queue_stats()
            with pytest.raises(PermissionDeniedError):
                await caller.set_drain(True)
        for caller, tenant_filter in (
            (ada, ""),  # a tenant admin must name their own tenant
            (ada, "some-other-tenant"),
            (alice, tenant.id),  # an operator has no admin:dlq
            (watcher, ""),
            (watcher, tenant.id),
        ):
            with pytest.raises(PermissionDeniedError):
                await caller.list_dlq_entries(tenant_id=tenant_filter)
        for caller in (alice, watcher):
            with pytest.raises(PermissionDeniedError):
                await caller.requeue_dlq_entry(unknown_entry)

        assert (await ada.list_dlq_entries(tenant_id=tenant.id))[0] == []
        with pytest.raises(NotFoundError):
            await ada.requeue_dlq_entry(unknown_entry)
    assert not (await root.get_queue_stats()).dispatch_paused
    assert (await root.list_dlq_entries(tenant_id=tenant.id))[0] == []
    with pytest.raises(NotFoundError):
        await root.requeue_dlq_entry(unknown_entry)

    in_system = await rbac_violations(e2e_pool, SYSTEM_TENANT, "ada")
    assert {v["resource"] for v in in_system} >= {
        "AdminService/GetQueueStats",
        "AdminService/SetDrain",
        "AdminService/ListDlqEntries",
    }
    assert all(v["reason"] == "TENANT_MISMATCH" for v in in_system)
    assert [v["resource"] for v in await rbac_violations(e2e_pool, tenant.id, "alice")] == [
        "AdminService/ListDlqEntries",
        "AdminService/RequeueDlqEntry",
    ]
    watcher_denials = await rbac_violations(e2e_pool, SYSTEM_TENANT, "watcher")
    assert len(watcher_denials) == 5
    assert {v["reason"] for v in watcher_denials} == {"MISSING_PERMISSION"}
