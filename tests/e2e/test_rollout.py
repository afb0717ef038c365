"""The dark launch and its rollback against real processes (docs/rollout.md, spec §9/§10).

Two api replicas, a worker and a real Redis: turning Stage E off refuses new submissions on
every replica within 5 s while a running execution finishes; only the internal tenant is let in
at first; its record-only executions call no handler at all (a counting action stays at zero)
yet are recorded with their steps and events; approval levels open one at a time; every flag
change is recorded with who, when, old and new.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from opsc_test_actions.counter import count_calls
from opsc_test_actions.probe import read_ledger

from opsconductor.client import (
    ApprovalLevelNotEnabledError,
    ExecutionClient,
    FeatureDisabledError,
    PermissionDeniedError,
)
from opsconductor.lifecycle.storage.flags import SYSTEM_TENANT, update_flags
from opsconductor.lifecycle.storage.role_bindings import bind_role

from . import inspection
from .background import background_plan
from .conftest import SECRET_TENANT, Tenant, running_stack, token
from .inspection import database_text, secret_fragments, tenant_row_counts, wait_until
from .plans import plan, probe_step
from .stack import Stack, start_service

pytestmark = pytest.mark.slow

SECRET_REF = {"$secret": "env:E2E_DB_PASSWORD"}
#: The rollback promise: every replica refuses new submissions this soon after the flag flips.
REFUSAL_WITHIN_S = 5.0


@pytest.fixture(scope="module")
async def stack(e2e_dsn: str, e2e_pool: asyncpg.Pool, redis_url: str) -> AsyncIterator[Stack]:
    """A worker, two api replicas (``api``, ``api-2``) and a real Redis."""
    async with running_stack(e2e_dsn, redis_url, OPSC_CONSUMER_POLL_INTERVAL_S="0.05") as running:
        api = running.services["api"]
        await start_service("api-2", running, dict(api.extra_env), module="api")
        yield running


@pytest.fixture
def root_actor() -> str:
    return f"root-{secrets.token_hex(3)}"


@pytest.fixture
async def root(
    stack: Stack, e2e_pool: asyncpg.Pool, root_actor: str
) -> AsyncIterator[ExecutionClient]:
    """A system admin's client; the flags are back to "everyone in, nothing gated" after."""
    actor = root_actor
    await bind_role(e2e_pool, SYSTEM_TENANT, actor, "admin", created_by="e2e")
    async with ExecutionClient(stack.address("api"), token(actor, SYSTEM_TENANT)) as client:
        try:
            yield client
        finally:
            await update_flags(
                e2e_pool,
                {
                    "stage_e_enabled": True,
                    "all_tenants_enabled": True,
                    "enabled_tenants": [],
                    "record_only_tenants": [],
                    "max_approval_level": 3,
                },
                by="e2e",
            )


def _replica(stack: Stack, name: str, tenant: Tenant, actor: str = "alice") -> ExecutionClient:
    return ExecutionClient(stack.address(name), token(actor, tenant.id))


def _read_plan(ledger: Path, **extra: Any) -> dict[str, Any]:
    return plan(probe_step("s1", ["host:web-01"], ledger), **extra)


async def test_flag_off_refuses_new_submissions_on_every_replica_within_5s_while_running_finish(
    stack: Stack, tenant: Tenant, root: ExecutionClient, tmp_path: Path, e2e_pool: asyncpg.Pool
) -> None:
    """Spec §10: a background execution is running when Stage E is turned off; both replicas
    refuse the next submissions (FAILED_PRECONDITION / STAGE_E_DISABLED, nothing written)
    within 5 s; the running execution still runs to success."""
    ledger = tmp_path / "running.jsonl"
    async with _replica(stack, "api", tenant) as alice:
        running = await alice.submit(
            background_plan(ledger, steps=2, hold_s=1.5), tenant_id=tenant.id
        )
        assert running.status == "queued"

        async def started() -> bool:
            return (await alice.get(running.execution_id, tenant_id=tenant.id)).status == "running"

        await wait_until(started, within_s=15, what="the background execution to run")

        flipped = time.monotonic()
        flags = await root.update_feature_flags(stage_e_enabled=False)
        assert flags.stage_e_enabled is False
        refused_after: dict[str, float] = {}
        for replica in ("api", "api-2"):
            async with _replica(stack, replica, tenant) as client:

                async def refused(client: ExecutionClient = client) -> FeatureDisabledError | None:
                    try:
                        await client.submit(_read_plan(tmp_path / "new.jsonl"), tenant_id=tenant.id)
                    except FeatureDisabledError as refusal:
                        return refusal
                    return None

                error = await wait_until(
                    refused, within_s=REFUSAL_WITHIN_S, what=f"{replica} to refuse", interval_s=0.05
                )
                refused_after[replica] = time.monotonic() - flipped
                assert error.reason == "STAGE_E_DISABLED"
                before = await tenant_row_counts(e2e_pool, tenant.id)
                with pytest.raises(FeatureDisabledError):
                    await client.submit(_read_plan(tmp_path / "new.jsonl"), tenant_id=tenant.id)
                after = await tenant_row_counts(e2e_pool, tenant.id)
                assert after["executions"] == before["executions"], "a refusal left a row"
        assert max(refused_after.values()) < REFUSAL_WITHIN_S, refused_after

        async def finished() -> str | None:
            done = await alice.get(running.execution_id, tenant_id=tenant.id)
            return done.status if done.is_terminal else None

        assert await wait_until(finished, within_s=30, what="the running one to end") == "succeeded"
    assert [line["outcome"] for line in read_ledger(ledger)] == ["ok", "ok"]


async def test_only_the_internal_tenant_is_let_in(
    stack: Stack, tenant: Tenant, root: ExecutionClient, tmp_path: Path, e2e_pool: asyncpg.Pool
) -> None:
    """Stage E on for the internal tenant only: it runs; any other tenant is refused with
    STAGE_E_DISABLED on every replica and nothing of it is written."""
    internal = await inspection.new_tenant(stack, e2e_pool)
    await root.update_feature_flags(
        stage_e_enabled=True, all_tenants_enabled=False, enabled_tenants=[internal.id]
    )
    for replica in ("api", "api-2"):
        async with _replica(stack, replica, internal) as client:

            async def runs(client: ExecutionClient = client) -> str | None:
                try:
                    done = await client.submit(
                        _read_plan(tmp_path / "internal.jsonl"), tenant_id=internal.id
                    )
                except FeatureDisabledError:
                    return None
                return done.status

            assert await wait_until(runs, within_s=REFUSAL_WITHIN_S, what="internal") == (
                "succeeded"
            )
        before = await tenant_row_counts(e2e_pool, tenant.id)
        async with _replica(stack, replica, tenant) as other:
            with pytest.raises(FeatureDisabledError) as caught:
                await other.submit(_read_plan(tmp_path / "other.jsonl"), tenant_id=tenant.id)
        assert caught.value.reason == "STAGE_E_DISABLED"
        assert await tenant_row_counts(e2e_pool, tenant.id) == before


@pytest.fixture
async def secret_tenant(stack: Stack, e2e_pool: asyncpg.Pool) -> Tenant:
    """The tenant whose namespace holds the planted secret (env:E2E_DB_PASSWORD)."""
    t = Tenant(id=SECRET_TENANT, stack=stack, pool=e2e_pool)
    await t.bind("alice", "operator")
    return t


def _record_only_plan(count_file: Path, ledger: Path) -> dict[str, Any]:
    return plan(
        {
            "id": "count",
            "action": "counter",
            "action_class": "read",
            "targets": [{"ref": "host:web-01"}],
            "params": {"file": str(count_file)},
        },
        probe_step("use-secret", ["db:primary"], ledger, emit=SECRET_REF),
    )


@pytest.mark.parametrize("mode", ["immediate", "background"])
async def test_record_only_calls_no_handler_and_records_everything(
    stack: Stack,
    secret_tenant: Tenant,
    root: ExecutionClient,
    tmp_path: Path,
    e2e_pool: asyncpg.Pool,
    mode: str,
) -> None:
    """Record-only: the execution, its steps and its events are written; no handler is called
    (the counting action counts zero, the probe's ledger stays empty); each step's record says
    what would have been called, the secret as its reference, its value nowhere."""
    tenant = secret_tenant
    await root.update_feature_flags(record_only_tenants=[tenant.id])
    count_file = tmp_path / "calls.jsonl"
    ledger = tmp_path / "ledger.jsonl"
    async with _replica(stack, "api", tenant) as alice:

        async def recorded() -> Any:
            done = await alice.submit(
                _record_only_plan(count_file, ledger), tenant_id=tenant.id, requested_mode=mode
            )
            return done if done.record_only else None

        submitted = await wait_until(recorded, within_s=REFUSAL_WITHIN_S, what="record-only")

        async def finished() -> Any:
            done = await alice.get(submitted.execution_id, tenant_id=tenant.id)
            return done if done.is_terminal else None

        done = await wait_until(finished, within_s=30, what="the record-only execution to end")
    assert done.status == "succeeded"
    assert done.execution_mode == mode
    assert count_calls(count_file) == 0, "a handler was called in record-only mode"
    assert read_ledger(ledger) == []
    counted, probed = sorted(done.steps, key=lambda s: s.position)
    assert counted.status == probed.status == "succeeded"
    assert counted.result == {
        "record_only": True,
        "would_run": {
            "action": "counter",
            "targets": ["host:web-01"],
            "params": {"file": str(count_file)},
        },
    }
    assert probed.result is not None
    assert probed.result["would_run"]["params"]["emit"] == SECRET_REF
    types = [
        row["type"]
        for row in await e2e_pool.fetch(
            "SELECT type FROM execution_events WHERE execution_id = $1 ORDER BY seq",
            submitted.execution_id,
        )
    ]
    assert types[0] == "execution_started"
    assert types[-1] == "execution_completed"
    assert types.count("step_started") == types.count("step_succeeded") == 2, types
    dump = await database_text(e2e_pool)
    for fragment in secret_fragments():
        assert fragment not in dump


async def test_approval_levels_open_one_at_a_time(
    stack: Stack, tenant: Tenant, root: ExecutionClient, tmp_path: Path, e2e_pool: asyncpg.Pool
) -> None:
    """With the highest level 0 only read plans run; a modify plan (level 1) is refused with
    APPROVAL_LEVEL_NOT_ENABLED and leaves nothing; at level 1 it waits for its approval, while a
    deploy plan (level 2) is still refused."""
    ledger = tmp_path / "ledger.jsonl"
    modify = plan(probe_step("s1", ["svc-1"], ledger, action_class="modify"))
    deploy = plan(
        probe_step("s1", ["svc-1"], ledger, action_class="deploy"),
        sla="medium",
        runbook_url="https://runbooks.example.com/deploy",
    )
    await root.update_feature_flags(max_approval_level=0)
    async with _replica(stack, "api-2", tenant, actor="dave") as dave:

        async def gated() -> ApprovalLevelNotEnabledError | None:
            try:
                await dave.submit(modify, tenant_id=tenant.id)
            except ApprovalLevelNotEnabledError as error:
                return error
            return None

        before = await tenant_row_counts(e2e_pool, tenant.id)
        error = await wait_until(gated, within_s=REFUSAL_WITHIN_S, what="level 1 to be gated")
        assert error.reason == "APPROVAL_LEVEL_NOT_ENABLED"
        assert await tenant_row_counts(e2e_pool, tenant.id) == before
        assert (await dave.submit(_read_plan(ledger), tenant_id=tenant.id)).status == "succeeded"

        await root.update_feature_flags(max_approval_level=1)

        async def waits() -> str | None:
            try:
                return (await dave.submit(modify, tenant_id=tenant.id)).status
            except ApprovalLevelNotEnabledError:
                return None

        assert await wait_until(waits, within_s=REFUSAL_WITHIN_S, what="level 1") == (
            "awaiting_approval"
        )
        with pytest.raises(ApprovalLevelNotEnabledError):
            await dave.submit(deploy, tenant_id=tenant.id)


async def test_every_flag_change_is_recorded_with_who_when_old_and_new(
    stack: Stack, tenant: Tenant, root: ExecutionClient, root_actor: str
) -> None:
    """UpdateFeatureFlags and SetDrain are recorded under the principal, old → new, newest
    first; a tenant's admin may not read the history (PERMISSION_DENIED)."""
    before = time.time()
    await root.update_feature_flags(
        enabled_tenants=["internal"], record_only_tenants=["internal"], max_approval_level=2
    )
    await root.set_drain(True)
    await root.set_drain(False)
    changes, _ = await root.list_flag_changes(page_size=10)
    assert [(c.flag, c.old_value, c.new_value) for c in changes[:2]] == [
        ("dispatch_paused", True, False),
        ("dispatch_paused", False, True),
    ]
    mine = {c.flag: c for c in changes[2:5]}
    assert mine["enabled_tenants"].new_value == ["internal"]
    assert mine["record_only_tenants"].new_value == ["internal"]
    assert mine["max_approval_level"].new_value == 2
    assert all(c.changed_by == root_actor for c in changes[:5])
    for change in changes[:5]:
        assert change.changed_at is not None
        assert change.changed_at.timestamp() >= before - 1
    only_level, _ = await root.list_flag_changes(flag="max_approval_level", page_size=1)
    assert [c.flag for c in only_level] == ["max_approval_level"]
    async with _replica(stack, "api", tenant, actor="ada") as tenant_admin:
        with pytest.raises(PermissionDeniedError):
            await tenant_admin.list_flag_changes()
