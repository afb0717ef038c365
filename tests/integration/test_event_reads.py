"""Reads of the event log: after a seq, the head of an execution, and paged audit listings."""

from __future__ import annotations

from uuid import UUID

import asyncpg
import pytest

from opsconductor.lifecycle.storage.event_reads import event_head, list_events, read_events_after
from opsconductor.lifecycle.storage.events import append_event
from opsconductor.lifecycle.storage.paging import InvalidPageRequestError

TENANT = "tenant-reads"


async def _execution(pool: asyncpg.Pool, tenant: str = TENANT) -> UUID:
    execution_id: UUID = await pool.fetchval(
        """
        INSERT INTO executions (tenant_id, actor_id, idempotency_key, plan_hash, plan_snapshot,
            plan_snapshot_hash, execution_mode, sla_class, action_class, timeout_ms)
        VALUES ($1, 'alice', md5(random()::text) || md5(random()::text), $2, $3, $4,
                'immediate', 'fast', 'read', 10000)
        RETURNING id
        """,
        tenant,
        "a" * 64,
        {"name": "reads", "steps": []},
        "b" * 64,
    )
    return execution_id


async def _append(
    pool: asyncpg.Pool,
    execution_id: UUID | None,
    type_: str,
    actor: str = "w",
    tenant: str = TENANT,
) -> None:
    async with pool.acquire() as conn, conn.transaction():
        await append_event(
            conn, tenant_id=tenant, execution_id=execution_id, actor_id=actor, type=type_
        )


async def test_read_after_and_head(db_pool: asyncpg.Pool) -> None:
    """Events after a seq come in seq order; the head names the last seq and, once written,
    the seq of execution_completed; an unknown execution has no head."""
    eid = await _execution(db_pool)
    for type_ in ("execution_started", "step_started", "execution_completed", "rbac_violation"):
        await _append(db_pool, eid, type_)
    events = await read_events_after(db_pool, eid, 1, limit=2)
    assert [(e.seq, e.type) for e in events] == [(2, "step_started"), (3, "execution_completed")]
    assert events[1].is_terminal
    assert not events[0].is_terminal
    assert events[0].to_json_dict()["execution_id"] == str(eid)
    head = await event_head(db_pool, eid)
    assert head is not None
    assert (head.tenant_id, head.last_seq, head.completed_seq) == (
        TENANT,
        4,
        3,
    )
    assert await event_head(db_pool, UUID(int=1)) is None


async def test_listing_pages_by_seq_or_by_id_with_filters(db_pool: asyncpg.Pool) -> None:
    """One execution's events page by seq after after_seq; the tenant-wide listing pages by
    id with type and actor filters, and never shows another tenant's events."""
    eid = await _execution(db_pool)
    other = await _execution(db_pool, "tenant-other")
    for i in range(5):
        await _append(db_pool, eid, f"e{i}")
    await _append(db_pool, None, "rbac_violation", actor="mallory")
    await _append(db_pool, other, "rbac_violation", actor="mallory", tenant="tenant-other")
    page, token = await list_events(db_pool, TENANT, execution_id=eid, after_seq=1, page_size=2)
    assert [e.seq for e in page] == [2, 3]
    assert token
    page, token = await list_events(
        db_pool, TENANT, execution_id=eid, after_seq=1, page_size=2, page_token=token
    )
    assert [e.seq for e in page] == [4, 5]
    assert token is None
    audit, token = await list_events(db_pool, TENANT, types=["rbac_violation"], actor_id="mallory")
    assert [(e.execution_id, e.seq, e.actor_id) for e in audit] == [(None, 0, "mallory")]
    assert audit[0].to_json_dict()["execution_id"] == ""
    everything, _ = await list_events(db_pool, TENANT)
    assert len(everything) == 6


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"page_size": -1}, "page_size"),
        ({"after_seq": -1}, "after_seq"),
        ({"types": [""]}, "types"),
        ({"types": [f"t{i}" for i in range(21)]}, "types"),
        ({"actor_id": "x" * 201}, "actor_id"),
        ({"page_token": "%%%"}, "page_token"),
        ({"page_token": "eyJrIjotMSwicyI6IngifQ"}, "page_token"),
    ],
)
async def test_invalid_listing_requests_name_the_field(
    db_pool: asyncpg.Pool, kwargs: dict[str, object], field: str
) -> None:
    with pytest.raises(InvalidPageRequestError) as invalid:
        await list_events(db_pool, TENANT, **kwargs)  # type: ignore[arg-type]
    assert [v.field for v in invalid.value.violations] == [field]


async def test_a_token_of_another_listing_is_refused(db_pool: asyncpg.Pool) -> None:
    eid = await _execution(db_pool)
    for i in range(3):
        await _append(db_pool, eid, f"e{i}")
    _, token = await list_events(db_pool, TENANT, execution_id=eid, page_size=1)
    assert token
    with pytest.raises(InvalidPageRequestError, match="another tenant or other filters"):
        await list_events(db_pool, TENANT, page_token=token)
