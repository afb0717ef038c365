"""Fair share end to end, through the real api and worker processes (finding 6 of issue 8,
docs/security.md "Fair share and quotas"):

* a flood of tenant A's urgent jobs no longer starves tenant B: B's zero-second job waits
  under a second (it waited 49 s in the finding);
* priority 0 needs ``executions:urgent``: without it the submit is refused and audited;
* quotas per tenant — waiting background jobs and immediate runs in flight refused
  ``RESOURCE_EXHAUSTED`` with a retry delay (the client's ``QuotaExceededError``), leaving no
  row; background jobs running at once held to the tenant's limit by the queue — with the
  tenant policy's overrides applied.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import yaml
from opsc_test_actions import read_ledger

from opsconductor.client import (
    Execution,
    PermissionDeniedError,
    QuotaExceededError,
)
from opsconductor.lifecycle.storage.flags import SYSTEM_TENANT

from .background import background_plan
from .conftest import Tenant, running_stack
from .inspection import rbac_violations, tenant_row_counts, wait_until
from .plans import plan, probe_step
from .stack import Stack

pytestmark = pytest.mark.slow

FLOOD = 40
#: Each of tenant A's jobs holds its worker this long: the flood is 40 × 0.25 s of work.
FLOOD_HOLD_S = 0.25
TERMINAL = {"succeeded", "failed", "cancelled", "rejected"}

#: Tenants the quota policy names (tenant ids are fixed in the policy file, so per module).
ROOMY = f"t-roomy-{secrets.token_hex(3)}"
WIDE = f"t-wide-{secrets.token_hex(3)}"
DEFAULT_QUOTAS = {"max_queued": 3, "max_running": 1, "max_immediate": 10}


@pytest.fixture(scope="module")
def quota_policy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("quota-policy") / "tenant_policy.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "defaults": {"quotas": DEFAULT_QUOTAS},
                "tenants": {
                    ROOMY: {"quotas": {"max_queued": 6}},
                    WIDE: {"quotas": {"max_running": 4}},
                },
            }
        )
    )
    return path


@pytest.fixture(scope="module")
async def stack(
    e2e_dsn: str, e2e_pool: asyncpg.Pool, redis_url: str, quota_policy: Path
) -> AsyncIterator[Stack]:
    """A real Redis, ONE worker with four consumer slots, every service on the quota policy."""
    async with running_stack(
        e2e_dsn,
        redis_url,
        tenant_policy_file=quota_policy,
        OPSC_CONSUMER_CONCURRENCY="4",
        OPSC_CONSUMER_POLL_INTERVAL_S="0.05",
    ) as running:
        yield running


@pytest.fixture(scope="module")
async def flood_stack(e2e_dsn: str, e2e_pool: asyncpg.Pool, redis_url: str) -> AsyncIterator[Stack]:
    """The finding's set-up: the default quotas and ONE consumer slot, so every job waits for
    the one before it."""
    async with running_stack(
        e2e_dsn,
        redis_url,
        OPSC_CONSUMER_CONCURRENCY="1",
        OPSC_CONSUMER_POLL_INTERVAL_S="0.05",
    ) as running:
        yield running


async def make_tenant(stack: Stack, pool: asyncpg.Pool, tenant_id: str | None = None) -> Tenant:
    tenant = Tenant(id=tenant_id or f"t-{secrets.token_hex(4)}", stack=stack, pool=pool)
    await tenant.bind("alice", "operator")
    await tenant.bind("rita", "responder")
    return tenant


async def queue_wait_s(pool: asyncpg.Pool, execution_id: str) -> float:
    """From the submit (execution created) to the worker's claim (started)."""
    waited = await pool.fetchval(
        "SELECT extract(epoch FROM started_at - created_at) FROM executions WHERE id = $1",
        execution_id,
    )
    return float(waited)


async def wait_all_terminal(pool: asyncpg.Pool, tenant_id: str, n: int, within_s: float) -> None:
    async def done() -> bool:
        count = await pool.fetchval(
            "SELECT count(*) FROM executions WHERE tenant_id = $1 AND status = ANY($2::text[]::"
            "execution_status[])",
            tenant_id,
            sorted(TERMINAL),
        )
        return bool(count == n)

    await wait_until(done, within_s=within_s, what=f"{n} executions of {tenant_id}")


# -- fair dequeue ----------------------------------------------------------------------------------


async def test_a_flood_of_tenant_a_leaves_tenant_b_waiting_under_a_second(
    flood_stack: Stack, e2e_pool: asyncpg.Pool, tmp_path: Path
) -> None:
    """40 priority-0 jobs of tenant A (submitted by a responder, so allowed), then one
    zero-second priority-50 job of tenant B: B's job starts after at most the A job that holds
    the one slot, not after the flood."""
    a = await make_tenant(flood_stack, e2e_pool)
    b = await make_tenant(flood_stack, e2e_pool)
    ledger = tmp_path / "ledger.jsonl"
    async with a.client("rita") as rita, b.client("alice") as alice:
        for i in range(FLOOD):
            queued = await rita.submit(
                background_plan(ledger, steps=1, hold_s=FLOOD_HOLD_S, target=f"a-{i}"),
                tenant_id=a.id,
                priority=0,
            )
            assert queued.status == "queued"
        b_job = await alice.submit(
            background_plan(ledger, steps=1, hold_s=0, target="b-0"), tenant_id=b.id
        )
        assert b_job.status == "queued"
        await wait_all_terminal(e2e_pool, b.id, 1, within_s=30)
        waited = await queue_wait_s(e2e_pool, b_job.execution_id)
        a_left = await e2e_pool.fetchval(
            "SELECT count(*) FROM executions WHERE tenant_id = $1 AND status = 'queued'", a.id
        )
        print(
            f"\ntenant B's job waited {waited:.3f} s behind a flood of {FLOOD} (A left: {a_left})"
        )
        assert waited < 1.0, f"tenant B waited {waited:.3f} s"
        assert a_left >= FLOOD // 2, "the flood was over before B's job ran: nothing was shown"
        await wait_all_terminal(e2e_pool, a.id, FLOOD, within_s=120)
    statuses = await e2e_pool.fetch(
        "SELECT status::text, count(*) FROM executions WHERE tenant_id = ANY($1) GROUP BY 1",
        [a.id, b.id],
    )
    assert {r["status"]: r["count"] for r in statuses} == {"succeeded": FLOOD + 1}


# -- priority 0 ------------------------------------------------------------------------------------


async def test_priority_0_without_executions_urgent_is_refused_audited_and_leaves_nothing(
    stack: Stack, e2e_pool: asyncpg.Pool, tmp_path: Path
) -> None:
    """An operator asking priority 0 gets PERMISSION_DENIED naming the missing permission (not
    a silently lowered priority), an rbac_violation event is filed; a responder may."""
    tenant = await make_tenant(stack, e2e_pool, f"t-{secrets.token_hex(4)}")
    ledger = tmp_path / "ledger.jsonl"
    urgent = plan(probe_step("check", ["srv-1"], ledger))
    async with tenant.client("alice") as alice:
        with pytest.raises(PermissionDeniedError) as denied:
            await alice.submit(urgent, tenant_id=tenant.id, priority=0)
        assert "executions:urgent" in denied.value.message
        ok = await alice.submit(urgent, tenant_id=tenant.id, priority=1)
        assert ok.status == "succeeded"
    counts = await tenant_row_counts(e2e_pool, tenant.id)
    assert counts["executions"] == 1  # only the priority-1 run
    [event] = await rbac_violations(e2e_pool, tenant.id, "alice")
    assert (event["reason"], event["tier"]) == ("MISSING_PERMISSION", "api")
    assert event["missing"] == ["executions:urgent"]
    assert event["resource"] == "ExecutionService/SubmitExecution"
    async with tenant.client("rita") as rita:
        done = await rita.submit(
            plan(probe_step("check", ["srv-2"], ledger)), tenant_id=tenant.id, priority=0
        )
    assert (done.status, done.priority) == ("succeeded", 0)


# -- quotas ----------------------------------------------------------------------------------------


async def fill_queue(
    client: Any, tenant: Tenant, ledger: Path, n: int
) -> list[tuple[dict[str, Any], Execution]]:
    """``n`` background plans submitted: each plan with its execution."""
    submitted = []
    for i in range(n):
        queued_plan = background_plan(ledger, steps=1, hold_s=0, target=f"q-{i}")
        submitted.append((queued_plan, await client.submit(queued_plan, tenant_id=tenant.id)))
    return submitted


async def test_waiting_background_jobs_beyond_the_quota_are_refused_with_a_retry_delay(
    stack: Stack, e2e_pool: asyncpg.Pool, tmp_path: Path
) -> None:
    """Dispatch drained, so jobs wait: the default tenant's 4th and the roomy tenant's 7th
    submit are refused RESOURCE_EXHAUSTED (QuotaExceededError, retry_after_s from the
    RetryInfo), leave no row, and a resubmit of an admitted plan still finds its execution."""
    system = Tenant(id=SYSTEM_TENANT, stack=stack, pool=e2e_pool)
    await system.bind("root", "admin")
    small = await make_tenant(stack, e2e_pool)
    roomy = await make_tenant(stack, e2e_pool, ROOMY)
    ledger = tmp_path / "ledger.jsonl"
    async with (
        system.client("root") as root,
        small.client("alice") as s_alice,
        roomy.client("alice") as r_alice,
    ):
        assert await root.set_drain(True)
        try:
            admitted = await fill_queue(s_alice, small, ledger, 3)
            await fill_queue(r_alice, roomy, ledger, 6)
            for client, tenant, limit in ((s_alice, small, 3), (r_alice, roomy, 6)):
                with pytest.raises(QuotaExceededError) as refused:
                    await client.submit(
                        background_plan(ledger, steps=1, hold_s=0, target="one-more"),
                        tenant_id=tenant.id,
                    )
                error = refused.value
                assert error.retry_after_s == 5.0
                assert error.details["quota"] == "queued"
                assert error.details["limit"] == str(limit)
                assert "max_queued" in error.message
                counts = await tenant_row_counts(e2e_pool, tenant.id)
                assert counts["executions"] == limit
            first_plan, first = admitted[0]
            again = await s_alice.submit(first_plan, tenant_id=small.id)
            assert again.execution_id == first.execution_id
        finally:
            assert not await root.set_drain(False)
        await wait_all_terminal(e2e_pool, small.id, 3, within_s=60)
        await wait_all_terminal(e2e_pool, roomy.id, 6, within_s=60)
        # Slots free again: the tenant may queue once more.
        late = await s_alice.submit(
            background_plan(ledger, steps=1, hold_s=0, target="late"), tenant_id=small.id
        )
        assert late.status == "queued"


async def test_fifty_racing_immediate_runs_against_a_quota_of_ten_run_exactly_ten(
    stack: Stack, e2e_pool: asyncpg.Pool, tmp_path: Path
) -> None:
    """50 different immediate plans submitted at once, each holding its target 5 s (longer
    than all 50 admissions take): exactly 10 run (and succeed), 40 are refused with a retry
    delay, and nothing of them is stored."""
    tenant = await make_tenant(stack, e2e_pool)
    ledger = tmp_path / "ledger.jsonl"
    async with tenant.client("alice") as alice:

        async def one(i: int) -> Execution:
            return await alice.submit(
                plan(probe_step("hold", [f"im-{i}"], ledger, hold_s=5.0)), tenant_id=tenant.id
            )

        results = await asyncio.gather(*(one(i) for i in range(50)), return_exceptions=True)
    ran = [r for r in results if isinstance(r, Execution)]
    refused = [r for r in results if isinstance(r, QuotaExceededError)]
    assert (len(ran), len(refused)) == (10, 40), [r for r in results if isinstance(r, Exception)]
    assert {r.status for r in ran} == {"succeeded"}
    assert all(r.retry_after_s is not None and 1.0 <= r.retry_after_s <= 60 for r in refused)
    assert {r.details["quota"] for r in refused} == {"immediate"}
    counts = await tenant_row_counts(e2e_pool, tenant.id)
    assert counts["executions"] == 10
    assert len(read_ledger(ledger)) == 10


def overlapping(lines: list[dict[str, Any]]) -> int:
    """The most probe runs in flight at once."""
    edges = sorted(
        [(line["start_ns"], 1) for line in lines] + [(line["end_ns"], -1) for line in lines],
        key=lambda edge: (edge[0], edge[1]),
    )
    peak = now = 0
    for _, delta in edges:
        now += delta
        peak = max(peak, now)
    return peak


async def test_running_background_jobs_are_held_to_the_tenants_limit(
    stack: Stack, e2e_pool: asyncpg.Pool, tmp_path: Path
) -> None:
    """Four consumer slots: the default tenant (max_running 1) runs its 3 jobs one at a time
    while the wide tenant (max_running 4) runs its 3 side by side."""
    small = await make_tenant(stack, e2e_pool)
    roomy = await make_tenant(stack, e2e_pool, WIDE)
    small_ledger, roomy_ledger = tmp_path / "small.jsonl", tmp_path / "roomy.jsonl"
    async with small.client("alice") as s_alice, roomy.client("alice") as r_alice:
        for i in range(3):
            await s_alice.submit(
                background_plan(small_ledger, steps=1, hold_s=0.6, target=f"s-{i}"),
                tenant_id=small.id,
            )
            await r_alice.submit(
                background_plan(roomy_ledger, steps=1, hold_s=0.6, target=f"r-{i}"),
                tenant_id=roomy.id,
            )
        await wait_all_terminal(e2e_pool, small.id, 3, within_s=60)
        await wait_all_terminal(e2e_pool, roomy.id, 3, within_s=60)
    assert overlapping(read_ledger(small_ledger)) == 1
    assert overlapping(read_ledger(roomy_ledger)) >= 2
