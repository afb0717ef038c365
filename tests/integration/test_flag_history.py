"""Every feature-flag write is recorded (who, when, old → new) by the trigger of migration 0005,
whoever writes it, and listed newest first with keyset pages."""

from __future__ import annotations

import asyncio
import itertools

import asyncpg
import pytest

from opsconductor.common.errors import InvalidArgumentError, PlanValidationError
from opsconductor.lifecycle.storage.flag_history import list_flag_changes
from opsconductor.lifecycle.storage.flags import update_flags


async def test_update_flags_records_who_and_old_and_new(db_pool: asyncpg.Pool) -> None:
    """A change through update_flags is one record per flag, under the principal's name."""
    await update_flags(db_pool, {"stage_e_enabled": True}, by="ann")
    await update_flags(
        db_pool, {"stage_e_enabled": False, "enabled_tenants": ["internal"]}, by="bob"
    )
    changes, token = await list_flag_changes(db_pool)
    assert token is None
    rows = [(c.flag, c.old_value, c.new_value, c.changed_by) for c in changes]
    # One update writes both of bob's rows (in either order), after ann's.
    assert sorted(rows[:2]) == [
        ("enabled_tenants", [], ["internal"], "bob"),
        ("stage_e_enabled", True, False, "bob"),
    ]
    # The seed's defaults (migration 0003) are the first old values.
    assert rows[2:] == [("stage_e_enabled", False, True, "ann")]
    assert all(c.changed_at is not None for c in changes)
    assert changes[0].changed_at >= changes[-1].changed_at


async def test_a_write_outside_the_api_is_recorded_too(db_pool: asyncpg.Pool) -> None:
    """An operator's UPDATE (or an older release) cannot skip the record; a DELETE is a
    change back to the default."""
    await update_flags(db_pool, {"max_approval_level": 1}, by="ann")
    await db_pool.execute(
        "UPDATE feature_flags SET value = '3'::jsonb, updated_by = 'psql-operator' "
        "WHERE name = 'max_approval_level'"
    )
    await db_pool.execute("DELETE FROM feature_flags WHERE name = 'max_approval_level'")
    changes, _ = await list_flag_changes(db_pool, flag="max_approval_level")
    assert [(c.old_value, c.new_value, c.changed_by) for c in changes] == [
        (3, None, "psql-operator"),
        (1, 3, "psql-operator"),
        (0, 1, "ann"),
    ]


async def test_pages_are_keyset_and_bound_to_their_filter(db_pool: asyncpg.Pool) -> None:
    for level in range(4):
        await update_flags(db_pool, {"max_approval_level": level}, by=f"p{level}")
    first, token = await list_flag_changes(db_pool, flag="max_approval_level", page_size=3)
    assert token is not None
    second, end = await list_flag_changes(
        db_pool, flag="max_approval_level", page_size=3, page_token=token
    )
    assert end is None
    assert [c.changed_by for c in first + second] == ["p3", "p2", "p1", "p0"]
    with pytest.raises(PlanValidationError):
        await list_flag_changes(db_pool, flag="stage_e_enabled", page_token=token)
    with pytest.raises(PlanValidationError):
        await list_flag_changes(db_pool, page_token="garbage")
    with pytest.raises(PlanValidationError):
        await list_flag_changes(db_pool, page_size=-1)
    with pytest.raises(InvalidArgumentError):
        await list_flag_changes(db_pool, flag="x" * 101)


async def test_racing_updates_each_leave_their_record(db_pool: asyncpg.Pool) -> None:
    """Concurrent updates serialise on the flag rows; none of their records is lost."""
    await asyncio.gather(
        *(update_flags(db_pool, {"max_approval_level": n % 4}, by=f"r{n}") for n in range(12))
    )
    changes, _ = await list_flag_changes(db_pool, flag="max_approval_level", page_size=50)
    assert sorted(c.changed_by for c in changes) == sorted(f"r{n}" for n in range(12))
    # Each record's old value is the previous record's new value: an exact chain of writes.
    ordered = list(reversed(changes))
    for before, after in itertools.pairwise(ordered):
        assert after.old_value == before.new_value
