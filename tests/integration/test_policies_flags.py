"""Timeout policies and feature flags against real Postgres: the seeded policy table and its
selection rules, validated and audited flag updates, and the flag cache's TTL and invalidation."""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Any

import asyncpg
import pytest

from opsconductor.common.errors import InvalidArgumentError, PlanValidationError, StorageError
from opsconductor.lifecycle.storage.flags import (
    FLAG_NAMES,
    SYSTEM_TENANT,
    FeatureFlags,
    FlagCache,
    load_flags,
    update_flags,
)
from opsconductor.lifecycle.storage.policies import (
    TimeoutPolicy,
    load_timeout_policies,
    select_policy,
)

ALLOWED = "fast+read, fast+modify, medium+read, medium+modify, medium+deploy, long+deploy"


# --- timeout policies -------------------------------------------------------------------------


async def test_the_six_seeded_policies_load_with_their_budgets(db_pool: asyncpg.Pool) -> None:
    """Spec §1.1/§3.6: six policies; fast 10 s, medium 30 s, long 10 min, with attempts/renewals."""
    policies = await load_timeout_policies(db_pool)
    assert set(policies) == {
        "fast_read",
        "fast_modify",
        "medium_read",
        "medium_modify",
        "medium_deploy",
        "long_deploy",
    }
    assert policies["fast_read"] == TimeoutPolicy(
        id="fast_read",
        sla_class="fast",
        action_class="read",
        execution_timeout_ms=10_000,
        step_timeout_ms=10_000,
        max_attempts=3,
        max_lease_renewals=1,
        lease_buffer_ms=5_000,
    )
    assert policies["medium_deploy"].execution_timeout_ms == 30_000
    assert policies["medium_deploy"].max_attempts == 5
    assert policies["long_deploy"].execution_timeout_ms == 600_000
    assert policies["long_deploy"].max_lease_renewals == 10


async def test_select_policy_finds_each_allowed_combination(db_pool: asyncpg.Pool) -> None:
    """Every seeded SLA × action class resolves to its own row."""
    policies = await load_timeout_policies(db_pool)
    for policy in policies.values():
        assert select_policy(policies, policy.sla_class, policy.action_class) is policy
    assert select_policy(policies, "fast", "read").id == "fast_read"


@pytest.mark.parametrize(
    ("sla", "action"), [("fast", "deploy"), ("long", "read"), ("x" * 500, "?")]
)
async def test_a_combination_without_policy_is_an_invalid_plan_naming_the_allowed_ones(
    db_pool: asyncpg.Pool, sla: str, action: str
) -> None:
    """fast+deploy (and any other missing pair) → PlanValidationError on field sla_class whose
    description lists the allowed combinations in a stable order."""
    policies = await load_timeout_policies(db_pool)
    with pytest.raises(PlanValidationError) as info:
        select_policy(policies, sla, action)
    [violation] = info.value.violations
    assert violation.field == "sla_class"
    assert ALLOWED in violation.description
    assert "x" * 41 not in str(info.value)


def test_select_policy_with_no_policies_says_none_are_configured() -> None:
    """An empty table still yields a clear invalid-plan error rather than a crash."""
    with pytest.raises(PlanValidationError, match="none configured"):
        select_policy({}, "fast", "read")


def test_policies_from_unknown_classes_are_listed_last() -> None:
    """Rows of classes this release does not know sort after the known ones in the message."""
    odd = TimeoutPolicy("odd", "eternal", "ponder", 1, 1, 1, 0, 0)
    known = TimeoutPolicy("fast_read", "fast", "read", 1, 1, 1, 0, 0)
    with pytest.raises(PlanValidationError) as info:
        select_policy({"odd": odd, "fast_read": known}, "fast", "deploy")
    assert "fast+read, eternal+ponder" in info.value.violations[0].description


# --- feature flags ----------------------------------------------------------------------------


async def _flag_events(pool: asyncpg.Pool) -> list[dict[str, Any]]:
    rows = await pool.fetch(
        "SELECT tenant_id, actor_id, execution_id, seq, payload FROM execution_events "
        "WHERE type = 'feature_flags_updated' ORDER BY id"
    )
    return [dict(r) for r in rows]


async def test_seeded_flags_are_the_dark_launch_defaults(db_pool: asyncpg.Pool) -> None:
    """After migration Stage E is off for everyone (spec §9.1 dark launch)."""
    flags = await load_flags(db_pool)
    assert flags == FeatureFlags()
    assert not flags.tenant_enabled("internal")
    assert FLAG_NAMES == (
        "stage_e_enabled",
        "all_tenants_enabled",
        "enabled_tenants",
        "record_only_tenants",
        "max_approval_level",
        "dispatch_paused",
    )


async def test_update_flags_applies_persists_and_audits(db_pool: asyncpg.Pool) -> None:
    """An update returns and stores the new values, records who changed what from what in a
    feature_flags_updated event under tenant _system, and stamps updated_by."""
    flags = await update_flags(
        db_pool,
        {"stage_e_enabled": True, "enabled_tenants": ["internal", "beta"], "max_approval_level": 2},
        by="ops-admin",
    )
    assert flags.stage_e_enabled
    assert flags.enabled_tenants == frozenset({"internal", "beta"})
    assert flags.max_approval_level == 2
    assert await load_flags(db_pool) == flags
    [event] = await _flag_events(db_pool)
    assert event["tenant_id"] == SYSTEM_TENANT
    assert event["actor_id"] == "ops-admin"
    assert event["execution_id"] is None
    assert event["payload"] == {
        "changes": {
            "enabled_tenants": ["beta", "internal"],
            "max_approval_level": 2,
            "stage_e_enabled": True,
        },
        "previous": {"enabled_tenants": [], "max_approval_level": 0, "stage_e_enabled": False},
    }
    by = await db_pool.fetchval(
        "SELECT updated_by FROM feature_flags WHERE name = 'stage_e_enabled'"
    )
    assert by == "ops-admin"


async def test_tenant_gates_follow_the_flags(db_pool: asyncpg.Pool) -> None:
    """A tenant may submit only with Stage E on and the tenant (or everyone) enabled; record-only
    is per tenant."""
    flags = await update_flags(
        db_pool,
        {"enabled_tenants": ["internal"], "record_only_tenants": ["shadow"]},
        by="ops",
    )
    assert not flags.tenant_enabled("internal")  # Stage E still off
    flags = await update_flags(db_pool, {"stage_e_enabled": True}, by="ops")
    assert flags.tenant_enabled("internal")
    assert not flags.tenant_enabled("other")
    flags = await update_flags(db_pool, {"all_tenants_enabled": True}, by="ops")
    assert flags.tenant_enabled("other")
    assert flags.record_only("shadow")
    assert not flags.record_only("internal")


@pytest.mark.parametrize(
    "changes",
    [
        {"stage_e_enabeld": True},
        {"stage_e_enabled": "yes"},
        {"stage_e_enabled": 1},
        {"dispatch_paused": None},
        {"enabled_tenants": "internal"},
        {"enabled_tenants": ["ok", ""]},
        {"record_only_tenants": ["t" * 101]},
        {"record_only_tenants": [1]},
        {"max_approval_level": 4},
        {"max_approval_level": -1},
        {"max_approval_level": True},
        {"max_approval_level": "2"},
        {"stage_e_enabled": True, "nonsense": 1},
    ],
)
async def test_invalid_flag_updates_are_rejected_whole(
    db_pool: asyncpg.Pool, changes: dict[str, object]
) -> None:
    """Unknown names and ill-typed values raise InvalidArgumentError naming the flag, and nothing
    is written or audited — not even the valid part of the update."""
    with pytest.raises(InvalidArgumentError) as info:
        await update_flags(db_pool, changes, by="ops")
    assert info.value.details["flag"] in changes
    assert await load_flags(db_pool) == FeatureFlags()
    assert await _flag_events(db_pool) == []


async def test_unknown_flag_error_lists_the_known_flags(db_pool: asyncpg.Pool) -> None:
    """The rejection tells the operator which names exist."""
    with pytest.raises(InvalidArgumentError, match="unknown feature flag") as info:
        await update_flags(db_pool, {"stage_e": True}, by="ops")
    assert "stage_e_enabled" in str(info.value.details["known"])


async def test_an_empty_update_changes_and_audits_nothing(db_pool: asyncpg.Pool) -> None:
    """No changes → the current flags, no event."""
    assert await update_flags(db_pool, {}, by="ops") == FeatureFlags()
    assert await _flag_events(db_pool) == []


async def test_concurrent_updates_serialise_and_audit_exact_previous_values(
    db_pool: asyncpg.Pool,
) -> None:
    """10 racing updates of one flag: each audit event's "previous" is the value the one before
    it wrote, so the trail is a chain with no lost update."""
    await asyncio.gather(
        *(update_flags(db_pool, {"max_approval_level": i % 4}, by=f"op-{i}") for i in range(10))
    )
    events = await _flag_events(db_pool)
    assert len(events) == 10
    chain = [e["payload"] for e in events]
    for before, after in itertools.pairwise(chain):
        assert after["previous"]["max_approval_level"] == before["changes"]["max_approval_level"]


async def test_stored_rows_of_unknown_flags_are_ignored_and_bad_values_refused(
    db_pool: asyncpg.Pool,
) -> None:
    """A flag row from a newer release is ignored; a corrupt value is a StorageError, not a
    silently wrong gate."""
    await db_pool.execute(
        "INSERT INTO feature_flags (name, value) VALUES ('future_flag', 'true'::jsonb)"
    )
    assert await load_flags(db_pool) == FeatureFlags()
    await db_pool.execute(
        "UPDATE feature_flags SET value = '\"on\"'::jsonb WHERE name = 'stage_e_enabled'"
    )
    with pytest.raises(StorageError):
        await load_flags(db_pool)


class ManualClock:
    """A monotonic clock the test advances by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_flag_cache_serves_cached_flags_until_the_ttl_passes(db_pool: asyncpg.Pool) -> None:
    """Without LISTEN the cache rereads only after its TTL: a change shows within ttl seconds."""
    clock = ManualClock()
    cache = FlagCache(db_pool, ttl=2.0, clock=clock)
    assert not (await cache.get()).stage_e_enabled
    await update_flags(db_pool, {"stage_e_enabled": True}, by="ops")
    clock.now += 1.9
    assert not (await cache.get()).stage_e_enabled
    clock.now += 0.2
    assert (await cache.get()).stage_e_enabled
    await update_flags(db_pool, {"stage_e_enabled": False}, by="ops")
    cache.invalidate()
    assert not (await cache.get()).stage_e_enabled


async def test_flag_cache_concurrent_readers_share_one_reload(db_pool: asyncpg.Pool) -> None:
    """Many tasks asking at once all get the flags; later ones are served from the cache."""
    cache = FlagCache(db_pool, clock=ManualClock())
    results = await asyncio.gather(*(cache.get() for _ in range(20)))
    assert all(r == FeatureFlags() for r in results)
    assert len({id(r) for r in results}) == 1


async def test_flag_cache_is_invalidated_by_the_change_notification(db_pool: asyncpg.Pool) -> None:
    """With LISTEN started, turning Stage E off reaches a cache whose TTL has not expired."""
    await update_flags(db_pool, {"stage_e_enabled": True}, by="ops")
    clock = ManualClock()  # frozen: only the notification can refresh the cache
    cache = FlagCache(db_pool, ttl=3600, clock=clock)
    await cache.start()
    await cache.start()  # idempotent
    try:
        assert (await cache.get()).stage_e_enabled
        await update_flags(db_pool, {"stage_e_enabled": False}, by="ops")
        deadline = time.monotonic() + 5
        while (await cache.get()).stage_e_enabled:
            assert time.monotonic() < deadline, "notification never invalidated the cache"
            await asyncio.sleep(0.01)
    finally:
        await cache.close()
    await cache.close()  # idempotent
    # The listening connection went back to the pool: every connection is free again.
    assert db_pool.get_idle_size() == db_pool.get_size()
